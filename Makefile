# d4ir-pipeline. Every target that runs code installs first (a stamp file), so each
# works from a fresh clone. Variables select the profile and models:
#   make synthesize PROFILE=sd15 SD_MODEL=/models/sd15
#   make distill STUDENT=nafnet_s
#   make bench BENCH="--quick synthesize"   (--smoke: tiny sizes; names: dpa synthesize distill deploy)
#   make export MODEL=runs/demo/distill/nafnet_s/student OUT=runs/demo/export/nafnet_s
#   make restore IN=photos/ OUT=restored/ MODEL=runs/demo/export/nafnet_s/model.onnx
#   make restore IN=photos/ OUT=restored/ MODEL=/models/wgws SET=model.weather=rain   (a non-blind teacher)
#   make test TEST_JOBS=4                   (test worker processes; 1: one process, in order)
PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= demo
WORK     ?= runs/$(PROFILE)
SD_MODEL ?=
TEACHER  ?=
STUDENT  ?=
SET      ?=
QUICK    ?= --quick
BENCH    ?=
MODEL    ?= $(WORK)/distill/nafnet_s/student
IN       ?=
OUT      ?=
TEST_JOBS ?= 2


BIN   := $(VENV)/bin
D4IR  := $(BIN)/d4ir
STAMP := $(VENV)/.stamp-install

# Optional per-call overrides turned into --set flags.
sd_set      = $(if $(SD_MODEL),--set sd.model=$(SD_MODEL))
teacher_set = $(if $(TEACHER),--set teacher.checkpoint=$(TEACHER))
student_set = $(if $(STUDENT),--set student.name=$(STUDENT))
extra_set   = $(foreach s,$(SET),--set $(s))
common      = --profile $(PROFILE) --work-dir $(WORK)
pytest_jobs = $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: install test test-fast demo synthesize distill evaluate table bench bench-gpu lint clean teacher data tiny-sd dpa prompt-bank label demo-sd smoke-sd15 gpu-check restore export

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# torch + torchvision in one resolve so the pair matches
	$(BIN)/python -m pip install torch torchvision
	$(BIN)/python -m pip install -e '.[dev,export]'
	touch $@

# the suite in TEST_JOBS worker processes (pytest-xdist), one test file per worker at a time so module
# fixtures are built once, the files with slow tests first (tests/conftest.py); every test pins one intra-op
# thread. TEST_JOBS=1: one process, in order.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra $(pytest_jobs) tests

# the edit loop: everything but the subprocess runs (SIGKILL resumes, torchrun, compare end to end, benchmark smoke)
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra $(pytest_jobs) -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check d4ir_pipeline tests benchmarks
	$(BIN)/ruff format --check d4ir_pipeline tests benchmarks

data: $(STAMP)
	$(D4IR) demo-data --out $(WORK)/data

tiny-sd: $(STAMP)
	$(D4IR) tiny-sd $(WORK)/tiny-sd

dpa: $(STAMP)
	$(D4IR) train-dpa $(common) $(sd_set) $(extra_set)

prompt-bank: $(STAMP)
	$(D4IR) prompt-bank $(common) $(extra_set)

synthesize: $(STAMP)
	$(D4IR) synthesize $(common) $(sd_set) $(extra_set)

# cache the teacher's outputs next to the shards once; later students skip the teacher
label: $(STAMP)
	$(D4IR) label $(common) $(teacher_set) $(extra_set)

distill: $(STAMP)
	$(D4IR) distill $(common) $(teacher_set) $(student_set) $(extra_set)

evaluate: $(STAMP)
	$(D4IR) evaluate $(common) $(teacher_set) $(student_set) $(extra_set)

teacher: $(STAMP)
	$(D4IR) demo-data --out runs/demo/data
	$(D4IR) train-teacher --profile demo --work-dir runs/demo

# rebuild the small demo SD committed in d4ir_pipeline/demo/assets/demo_sd (docs/DEMO_SD.md; ~40 min CPU)
demo-sd: $(STAMP)
	$(D4IR) demo-data --out runs/demo/data
	$(D4IR) demo-sd --out d4ir_pipeline/demo/assets/demo_sd --work runs/demo/demo-sd.train --overwrite

# ship a model: ONNX (fp32 / fp16 / int8) + pt2 + model card, verified (docs/DEPLOY.md)
export: $(STAMP)
	$(D4IR) export $(MODEL) --out $(or $(OUT),$(WORK)/export/$(notdir $(patsubst %/student,%,$(MODEL)))) $(extra_set)

# run a model on an image, a folder tree or a manifest (exit code 1: some inputs skipped, see the summary)
restore: $(STAMP)
	$(D4IR) restore $(IN) --model $(MODEL) --out $(OUT) $(extra_set)

table: $(STAMP)
	$(D4IR) compare $(common) $(QUICK) $(sd_set) $(teacher_set) $(student_set) $(extra_set)

# The main job on the embedded default: every stage, in order.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m d4ir_pipeline.demo.run --work-dir $(WORK)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py $(BENCH)

# SD 1.5-sized synthesis on a CUDA GPU (random weights, no download); results in runs/bench-gpu.json
bench-gpu: $(STAMP)
	mkdir -p runs
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_synthesis.py --json runs/bench-gpu.json $(BENCH)

# The sd15 profile's real commands at real size (SD 1.5-shaped random weights, 512 px, CLIP
# ViT-L/14 DPA, full-size tiled teacher); report in runs/smoke-sd15/report.json (docs/SD15_SMOKE.md)
smoke-sd15: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m d4ir_pipeline.demo.smoke_sd15 --work-dir runs/smoke-sd15

# One prepared check for a CUDA machine (~8 min): the smoke in fp16, torchrun NCCL distillation,
# restore in fp16 vs fp32 (benchmarks/gpu_deploy.py), bench-gpu; results in runs/gpu-check.json.
# Stops at once without CUDA.
gpu-check: $(STAMP)
	mkdir -p runs
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py --json runs/gpu-check.json

clean:
	rm -rf runs .pytest_cache .ruff_cache
