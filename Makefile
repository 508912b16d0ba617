# Everything from nothing: `make demo` (the main job on built-in data), `make test` (the suite CI runs).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTHON ?= python3
# `disttrain launch` is accelerate launch passing the stage's exit code on (2 bad input, 75 stopped
# with its state saved); accelerate's defaults spelled out, so it does not warn; --multi_gpu + 2
# processes gives two gloo ranks on a machine without GPU (with --cpu it would start only one)
LAUNCH2 := $(BIN)/disttrain launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no
export HF_HUB_OFFLINE := 1

.PHONY: venv demo demo-cmg test test-fast system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU/CUDA wheels of this version are what the project is tested with
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo_data/demo.json: | $(STAMP)
	$(BIN)/disttrain demo-data --out demo_data

# the MixupOE pipeline on the demo data, one MLflow parent run with a nested run per stage:
# Standard model -> OE and MixupOE fine-tuning on the demo's outlier pool -> evaluation of all
# three (held-out species, textures, noise, ID/texture interpolations) -> the paper's tables
DEMO_METHODS := oe mixup_oe
comma := ,
space := $(empty) $(empty)
demo: $(STAMP) demo_data/demo.json
	mkdir -p runs
	parent=$$($(BIN)/disttrain pipeline start demo --preset demo \
	  --methods standard,$(subst $(space),$(comma),$(DEMO_METHODS))) && export DISTTRAIN_PARENT_RUN_ID=$$parent && \
	$(LAUNCH2) recipes/train_classifier.py --preset demo && \
	for m in $(DEMO_METHODS); do \
	  $(LAUNCH2) recipes/finetune_oe.py --preset demo method=$$m run_dir=runs/finetune_oe/demo-$$m || exit 1; done && \
	$(LAUNCH2) recipes/evaluate.py --preset demo && \
	for m in $(DEMO_METHODS); do \
	  $(LAUNCH2) recipes/evaluate.py --preset demo model=runs/finetune_oe/demo-$$m run_dir=runs/evaluate/demo-$$m \
	    scorers=[msp,energy] || exit 1; done && \
	$(BIN)/python recipes/report.py --preset demo && \
	$(BIN)/disttrain pipeline end $$parent

# the CMG pipeline on the demo data, one MLflow parent run: stage 1 (the demo classifier -- reused
# when `make demo` trained it already -- and a CVAE) -> class-mixed pseudo-OOD shards -> stage 2
# (cmg_softmax, cmg_energy: the last layer on ID + pseudo-OOD) -> evaluation -> Table 1 (CMG-e vs MSP)
CMG_METHODS := cmg_softmax cmg_energy
CMG_EVAL := --preset demo scorers=[msp] ood=[demo_data/holdout,demo_data/far_ood] interpolate=[]
demo-cmg: $(STAMP) demo_data/demo.json
	mkdir -p runs
	parent=$$($(BIN)/disttrain pipeline start cmg-demo --preset demo \
	  --methods standard,$(subst $(space),$(comma),$(CMG_METHODS))) && export DISTTRAIN_PARENT_RUN_ID=$$parent && \
	if ! grep -qs '"finished"' runs/train_classifier/demo/status.json; then \
	  $(LAUNCH2) recipes/train_classifier.py --preset demo || exit 1; fi && \
	$(LAUNCH2) recipes/train_cvae.py --preset demo && \
	$(LAUNCH2) recipes/synthesize.py --preset demo method=cmg && \
	for m in $(CMG_METHODS); do \
	  $(LAUNCH2) recipes/finetune_head.py --preset demo method=$$m run_dir=runs/finetune_head/demo-$$m || exit 1; done && \
	$(LAUNCH2) recipes/evaluate.py $(CMG_EVAL) scorers=[msp,energy] run_dir=runs/evaluate/cmg_demo && \
	for m in $(CMG_METHODS); do \
	  $(LAUNCH2) recipes/evaluate.py $(CMG_EVAL) model=runs/finetune_head/demo-$$m run_dir=runs/evaluate/demo-$$m \
	    || exit 1; done && \
	$(BIN)/python recipes/report.py --preset cmg_demo && \
	$(BIN)/disttrain pipeline end $$parent

# Slurm + MUNGE from Debian for tests/test_slurm.py (which skip, saying why, without them)
system-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; \
	else echo "note: Slurm/MUNGE missing and not root: the Slurm tests will be skipped"; fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

bench: $(STAMP)
	$(BIN)/python recipes/benchmark.py --preset cpu
	$(BIN)/python recipes/benchmark.py --preset resnet50_448_cpu

clean:
	rm -rf runs mlruns mlflow.db mlartifacts demo_data
