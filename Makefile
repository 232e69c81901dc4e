# One target per job. Every target creates .venv itself when missing (or when pyproject.toml or the lock
# changed): torch first, then the exact versions of requirements/lock.txt, then the library `mora` from this
# checkout (editable, no deps). experiments/, analysis/ and benchmarks/ are not installed: they run from the
# checkout (the entry scripts and pytest put its root on sys.path; `python -m analysis` runs from here).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements/lock.txt
TORCH  := $(shell sed -n 's/^torch==//p' $(LOCK))
# torch's CPU build, for machines without a GPU and without a local wheel (PyPI's Linux wheel is the CUDA build)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
COMMA := ,
SPACE := $(subst ,, )

.PHONY: install test test-fast bench gpu-check rank-table fig2 fig3 table2 uuid fig4 table3 fig5 pretrain \
        table1 table1-instruct table1-math table1-biomed table1-lr-grid table1-instruct-lr-grid table1-math-lr-grid \
        table1-biomed-lr-grid table4 table6 table7 finetune \
        all snapshot regime figures calibrate-finetune calibrate-uuid calibrate-uuid-epochs calibrate-uuid-base calibrate-c4 c4-lr-grid c4-tokens-sweep c4-tokens-sweep-short c4-tokens-sweep-long \
        base c4-diagnosis uuid-pairs-sweep clean

# torch: a local wheel when pip finds one (its find-links; deps come with the lock), else the CPU index where
# there is no nvidia-smi, else PyPI's default (CUDA) build. GPU machines may use environment.yml instead.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-index --no-deps torch==$(TORCH) 2>/dev/null || { \
	  echo "no local torch==$(TORCH) wheel: installing it from an index"; \
	  if command -v nvidia-smi >/dev/null; then $(PY) -m pip install --quiet torch==$(TORCH); \
	  else $(PY) -m pip install --quiet --index-url $(TORCH_CPU_INDEX) torch==$(TORCH); fi; }
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

## the test suite (CI runs exactly this)
test: $(STAMP)
	$(PY) -m pytest

## the suite without the LLaMA-2-7B-shape checks (seconds)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

## one projection, side by side: every MoRA operator vs its straightforward implementation (benchmarks/straightforward.py),
## peft's LoRA and the bare Linear; LLaMA-2-7B shapes, 256 and 2,048 tokens, r = 8 and 256, float32, plus bfloat16 at
## 4096->4096 and 256 tokens (bfloat16 GEMMs are ~6x slower than float32 on a CPU without bf16 units). Step time, memory,
## ΔW build, a verdict per row. In parts, each one run of bench_adapters.py (its own rounds and noise band, one table):
## bench-float32-t256, bench-float32-t2048-<k>x<d> (one LLaMA-2-7B shape each), bench-bfloat16-r8, -r256; each writes
## results/bench/<part>.json, copies it to benchmarks/measured/ (replacing the old results it overlaps) and re-renders
## the README's tables. Timing assumes the other core idle: run the parts one at a time
BENCH_SHAPES := 4096x4096 4096x11008 11008x4096
BENCH_PARTS  := bench-float32-t256 $(foreach shape,$(BENCH_SHAPES),bench-float32-t2048-$(shape)) \
                bench-bfloat16-r8 bench-bfloat16-r256
.PHONY: $(BENCH_PARTS)
bench: $(BENCH_PARTS)
bench-float32-t256: BENCH_ARGS = --tokens 256
$(filter bench-float32-t2048-%,$(BENCH_PARTS)): BENCH_ARGS = --tokens 2048 --shapes $(@:bench-float32-t2048-%=%)
$(filter bench-bfloat16-%,$(BENCH_PARTS)): BENCH_ARGS = --dtype bfloat16 --tokens 256 --shapes 4096x4096 \
                                                        --ranks $(@:bench-bfloat16-r%=%)
$(BENCH_PARTS): $(STAMP)
	$(PY) benchmarks/bench_adapters.py $(BENCH_ARGS) --out results/bench/$(subst -,_,$(@:bench-%=adapters_%)).json
	$(PY) benchmarks/report.py results/bench/$(subst -,_,$(@:bench-%=adapters_%)).json

## one training step of a small LLaMA (all 7 projections adapted): bare, LoRA, MoRA share, MoRA rotate, side by side;
## results/bench/model.json, copied to benchmarks/measured/, the README table re-rendered
.PHONY: bench-model
bench-model: $(STAMP)
	$(PY) benchmarks/bench_model.py --out results/bench/model.json
	$(PY) benchmarks/report.py results/bench/model.json

## kernels per call, counted not timed: aten operators (each a kernel on a GPU), host syncs and, on CUDA, the
## kernels launched, for every adapter's step, adapter alone and ΔW build at LLaMA-2-7B shapes (results/bench/)
.PHONY: count-ops
count-ops: $(STAMP)
	$(PY) benchmarks/count_ops.py --out results/bench/count_ops.json

## the GPU code path in one script (minutes, no downloads): every task kind in float32 and bfloat16, the adapter
## benchmark, MoRA vs LoRA whole-model step time and peak memory at LLaMA-2-7B shape, every operator's exactness on
## the device (results/gpu_check/; measured on an H200: docs/gpu.md);
## without a GPU it stops at once (the CPU dry run: experiments/gpu_check.py --device cpu --tiny)
gpu-check: $(STAMP)
	$(PY) experiments/gpu_check.py

## per-module r̂ of MoRA at LLaMA-2-7B shapes (the README table)
rank-table: $(STAMP)
	$(PY) -m mora.rank_table

# ---- UUID memorisation (Section 3, Section 5.1), mini scale: conf/preset/uuid_mini.yaml, calibrated from the
# baselines alone (docs/calibration.md). Every arm runs every learning rate of its grid (lr_grid_by_method in
# the preset, read by experiments/lr_grid.py) at every seed; the reports keep each arm's best rate (Table 2's
# rule). JOBS runs at once, one thread each; completed runs are skipped, so the targets share their runs.
RUN     = OMP_NUM_THREADS=1 $(PY) experiments/run.py -m hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) experiment=uuid_memory
LR_GRID = $$($(PY) experiments/lr_grid.py task=uuid method=$(1))
SEEDS  ?= 0,1,2
REPORT := $(PY) -m analysis uuid --runs results/runs --out reports/uuid

## Fig. 2: FFT and LoRA at paper ranks 8, 128, 256, each over its grid
fig2: base
	$(RUN) method=fft lr=$(call LR_GRID,fft) seed=$(SEEDS)
	$(RUN) method=lora rank=8,128,256 lr=$(call LR_GRID,lora) seed=$(SEEDS)
	$(REPORT)

## Fig. 3: LoRA vs MoRA at ranks 8 and 256, each over its grid
fig3: base
	$(RUN) method=lora rank=8,256 lr=$(call LR_GRID,lora) seed=$(SEEDS)
	$(RUN) method=mora rank=8,256 lr=$(call LR_GRID,mora) seed=$(SEEDS)
	$(REPORT)

## Table 2: character accuracy over steps, FFT / LoRA / MoRA at ranks 8 and 256 (45 runs: 5 arms x 3 rates x 3 seeds)
table2: base
	$(RUN) method=fft lr=$(call LR_GRID,fft) seed=$(SEEDS)
	$(RUN) method=lora rank=8,256 lr=$(call LR_GRID,lora) seed=$(SEEDS)
	$(RUN) method=mora rank=8,256 lr=$(call LR_GRID,mora) seed=$(SEEDS)
	$(REPORT)

## beyond the paper (issue 12, item 4): Table 2's arms as the number of pairs grows (batch = 0.3 N), each at its
## Table 2 learning rate (analysis best-lr reads it from Table 2's runs), 3 seeds; the preset's own N is
## Table 2's runs. results/pairs_sweep/pairs<N>/, reports/uuid/pairs_sweep.{md,png}
SWEEP_PAIRS ?= 10 20 40 80
BEST_LR = $$($(PY) -m analysis best-lr --runs results/runs --method $(1) $(2))
uuid-pairs-sweep: table2
	preset_pairs=$$($(PY) experiments/config_value.py task.n_pairs task=uuid); \
	for n in $(SWEEP_PAIRS); do \
	  [ "$$n" = "$$preset_pairs" ] && continue; \
	  opts="task.n_pairs=$$n train.batch_size=$$((n * 3 / 10)) seed=$(SEEDS) out_root=results/pairs_sweep/pairs$$n"; \
	  $(RUN) method=fft lr=$(call BEST_LR,fft) $$opts || exit 1; \
	  for r in 8 256; do \
	    $(RUN) method=lora rank=$$r lr=$(call BEST_LR,lora,--rank $$r) $$opts || exit 1; \
	    $(RUN) method=mora rank=$$r lr=$(call BEST_LR,mora,--rank $$r) $$opts || exit 1; \
	  done; \
	done
	$(PY) -m analysis uuid-pairs --runs results/runs results/pairs_sweep --out reports/uuid

uuid: fig2 fig3 table2 uuid-pairs-sweep

# ---- C4 pretraining from scratch (Section 5.3, Appendix B), mini scale: conf/preset/c4_mini.yaml, calibrated from
# the baselines alone (docs/calibration.md, Amendment 5). The targets share their runs (completed runs are skipped);
# every run saves its loss curve, perplexity and ΔW spectra. Choosing the rates and running the table are two
# targets, as the paper's own search and its reported runs are two steps: c4-lr-grid runs each arm's grid
# (lr_grid_by_method) at seed 0; table3 runs each arm at the rate Table 3's rule (analysis best-lr --task c4)
# chooses from the grid runs under C4_LR_FROM, at seed 0 and C4_SEEDS. C4_LR_FROM is by default the committed grid
# runs behind the README (tests/fixtures/measured); after `make c4-lr-grid`, pass C4_LR_FROM=results/runs to use
# this clone's own grid (the whole chain from nothing: make c4-lr-grid table3 C4_LR_FROM=results/runs).
PRETRAIN         = $(FINETUNE) experiment=pretrain_c4
PRETRAIN_REPORT := $(PY) -m analysis pretrain --runs results/runs --out reports/pretrain
C4_ADAPTERS     := lora mora relora remora
C4_ARMS         := fft,$(subst $(SPACE),$(COMMA),$(C4_ADAPTERS))
C4_SEEDS        ?= 1,2
C4_LR_FROM      ?= tests/fixtures/measured
C4_LR_GRID       = $$($(PY) experiments/lr_grid.py task=c4 method=$(1))
# sets the shell variable rates to "lr_by_method.<arm>=<rate> ..." for the arms $(1), each at the rate Table 3's
# rule chooses from the grid runs under $(2) (default C4_LR_FROM; paper rank 128 for the adapters), and prints it
define C4_CHOSEN_RATES
lrs=$$($(PY) -m analysis best-lr --task c4 --runs $(or $(2),$(C4_LR_FROM)) --method $(subst $(SPACE),$(COMMA),$(1)) \
	  --rank 128) || exit 1; \
	rates=""; set -- $$lrs; for m in $(1); do rates="$$rates lr_by_method.$$m=$$1"; shift; done; \
	echo "Table 3's rates (its rule on the grid runs under $(or $(2),$(C4_LR_FROM))):$$rates"
endef

# prints the rates Table 3's rule chooses for the arms $(1) from this clone's grid runs beside the committed grid's
define C4_GRID_VS_COMMITTED
@$(call C4_CHOSEN_RATES,$(1),results/runs); here=$$rates; \
	$(call C4_CHOSEN_RATES,$(1),tests/fixtures/measured); \
	[ "$$here" = "$$rates" ] || echo "this grid chose other rates than the committed one: run make table3 C4_LR_FROM=results/runs"
endef

## Table 3's learning-rate search: every arm's grid at seed 0 (19 runs), into results/runs/; the report lists each
## arm's chosen rate beside the committed grid's (reports/pretrain). In one part per arm for the 30-min wall clock
## (issue 12): c4-lr-grid-fft, -lora, -mora, -relora, -remora (3 or 5 runs each), each comparing its arm's choice
## with the committed one and writing the report of the runs so far; c4-lr-grid runs them all
C4_LR_GRID_PARTS := $(foreach m,fft $(C4_ADAPTERS),c4-lr-grid-$(m))
.PHONY: $(C4_LR_GRID_PARTS)
c4-lr-grid: $(C4_LR_GRID_PARTS)
	$(call C4_GRID_VS_COMMITTED,fft $(C4_ADAPTERS))
# a part's arm from its name: c4-lr-grid-<method>
$(C4_LR_GRID_PARTS): $(STAMP)
	$(PRETRAIN) method=$(@:c4-lr-grid-%=%) lr=$(call C4_LR_GRID,$(@:c4-lr-grid-%=%)) seed=0
	$(call C4_GRID_VS_COMMITTED,$(@:c4-lr-grid-%=%))
	$(PRETRAIN_REPORT)

## Fig. 4 (loss curves), Table 3 (C4 validation perplexity), Fig. 5 (singular values of ΔW > 0.1): every arm at its
## chosen rate (C4_LR_FROM's grid) at seed 0 and C4_SEEDS: 15 runs in one multirun, so the JOBS workers stay busy
## (lr null: each method's rate is its lr_by_method entry, set here to the chosen one)
fig4 table3 fig5 pretrain: $(STAMP)
	$(call C4_CHOSEN_RATES,fft $(C4_ADAPTERS)); \
	$(PRETRAIN) method=$(C4_ARMS) $$rates seed=0,$(C4_SEEDS)
	$(PRETRAIN_REPORT)

## beyond the paper (issue 12, item 4, for C4; docs/calibration.md, Amendment 7): FFT, LoRA and MoRA at other step
## budgets (1,000 = Table 3's runs), i.e. other training tokens per parameter, each at its Table 3 rate (analysis
## best-lr on C4_LR_FROM's grid), warm-up 10% and evaluations every 10% of the budget, seeds 0 and C4_SEEDS;
## results/c4_tokens_sweep/steps<S>/, reports/pretrain/c4_tokens_sweep.{md,png}. Split by cost, each part writing
## the sweep report of the runs so far: c4-tokens-sweep-short (250 and 500 steps, 18 runs, 23 min on 2 cores) and
## c4-tokens-sweep-long (2,000 steps, 9 runs of 8.5-13.5 min each, 2 at a time: about 52 min), or the latter in parts
## of one seed each, c4-tokens-sweep-long-s0, -s1, -s2 (3 runs: FFT beside LoRA, then MoRA; about 26 min each).
## c4-tokens-sweep runs Table 3 (the 1,000-step point), the short part and the long one.
C4_SWEEP_STEPS ?= 250 500 2000
C4_SWEEP_ARMS  := fft lora mora
C4_SWEEP_LONG_PARTS := $(foreach seed,0 $(subst $(COMMA),$(SPACE),$(C4_SEEDS)),c4-tokens-sweep-long-s$(seed))
.PHONY: $(C4_SWEEP_LONG_PARTS)
C4_TOKENS_REPORT := $(PY) -m analysis c4-tokens --runs results/runs results/c4_tokens_sweep --out reports/pretrain
# a long part's seed is its name's suffix; every other part runs seed 0 and C4_SEEDS
C4_SWEEP_SEEDS = $(if $(filter $(C4_SWEEP_LONG_PARTS),$@),$(@:c4-tokens-sweep-long-s%=%),0,$(C4_SEEDS))
c4-tokens-sweep-short: C4_SWEEP_STEPS = 250 500
c4-tokens-sweep-long $(C4_SWEEP_LONG_PARTS): C4_SWEEP_STEPS = 2000
c4-tokens-sweep-short c4-tokens-sweep-long $(C4_SWEEP_LONG_PARTS): $(STAMP)
	$(call C4_CHOSEN_RATES,$(C4_SWEEP_ARMS)); \
	for s in $(C4_SWEEP_STEPS); do \
	  evals=$$(seq -s, $$((s / 10)) $$((s / 10)) $$s); \
	  opts="train.max_steps=$$s train.warmup_steps=$$((s / 10)) train.ckpt_every=$$((s / 5)) train.eval_steps=[$$evals]"; \
	  $(PRETRAIN) method=$(subst $(SPACE),$(COMMA),$(C4_SWEEP_ARMS)) $$rates $$opts seed=$(C4_SWEEP_SEEDS) \
	    out_root=results/c4_tokens_sweep/steps$$s || exit 1; \
	done
	$(C4_TOKENS_REPORT)

c4-tokens-sweep: table3 c4-tokens-sweep-short c4-tokens-sweep-long
	$(C4_TOKENS_REPORT)

## C4 calibration (docs/calibration.md, Amendment 5): FFT and LoRA only, seed 0, on the x2 ladder of learning
## rates, into results/runs/ (Table 3 reuses them); reports/calibration_c4/c4_calibration.md. In one part per
## baseline for the 30-min wall clock (issue 12): calibrate-c4-fft, calibrate-c4-lora (5 runs each), each writing
## the report of the runs so far; calibrate-c4 runs both
CAL_C4_LR    ?= 5e-4,1e-3,2e-3,4e-3,8e-3
CAL_C4_PARTS := calibrate-c4-fft calibrate-c4-lora
.PHONY: $(CAL_C4_PARTS)
calibrate-c4: $(CAL_C4_PARTS)
# a part's baseline from its name: calibrate-c4-<method>
$(CAL_C4_PARTS): $(STAMP)
	$(FINETUNE) experiment=pretrain_c4 method=$(@:calibrate-c4-%=%) lr=$(CAL_C4_LR) seed=0
	$(PY) -m analysis c4-calibration --runs results/runs --out reports/calibration_c4

# ---- Fine-tuning (Section 5.2, Table 5, Appendix C), mini scale: stories260K, 100 steps, lm-eval after
# training. Runs are small, so JOBS of them run at once (Hydra's joblib launcher, one thread each);
# completed runs are skipped, so the targets share their runs (Table 4's rotate r=8 and share r=256 are
# Table 1's MoRA rows; Table 6 is Table 1's BioMed column).
JOBS        ?= 2
FINETUNE    := OMP_NUM_THREADS=1 $(PY) experiments/run.py -m hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)
FT_REPORT   := $(PY) -m analysis finetune --runs results/runs --out reports/finetune

FT_SEEDS    ?= 1,2
FT_RANKS    := 8 256# Table 1's paper ranks, one preset each (conf/experiment/finetune_r<rank>.yaml)
FT_ONLY     ?=# a comma-separated subset of Table 1's methods (empty: all), e.g. FT_ONLY=fft,lora,mora
FT_LR_FROM  ?= tests/fixtures/measured
# Choosing the rates and running the table are two targets, as for Table 3 (docs/calibration.md, Amendment 6):
# table1-<task>-lr-grid runs every learning-rate grid of the preset at seed 0; table1-<task> runs each arm at the
# rate the selection rule (analysis best-lr: FINETUNE_SELECTION_RULE) chooses from the grid runs under FT_LR_FROM,
# at seed 0 and FT_SEEDS. FT_LR_FROM is by default the committed grid runs behind the README
# (tests/fixtures/measured); after a grid target, FT_LR_FROM=results/runs uses this clone's own grid.
# r = 8 runs Eq. 9 (rotate), r = 256 Eq. 6 (share).

# sets the shell variables methods (comma-separated) and rates ("lr_by_rank.r<rank>.<method>=<rate> ...") for task
# $(1)'s Table 1 arms at rank $(2), each at the rate the rule chooses from the grid runs under $(3) (default
# FT_LR_FROM), and prints the rates
define FT_CHOSEN_RATES
op=$$($(PY) experiments/config_value.py method.operator experiment=finetune_r$(2) task=$(1)) || exit 1; \
	arms=$$($(PY) experiments/lr_grid.py --methods --only "$(FT_ONLY)" experiment=finetune_r$(2) task=$(1)) || exit 1; \
	methods=$$(echo $$arms | tr ' ' ,); rates=""; \
	if [ -n "$$methods" ]; then \
	  lrs=$$($(PY) -m analysis best-lr --task $(1) --runs $(or $(3),$(FT_LR_FROM)) --method $$methods --rank $(2) \
	    --where method.operator=$$op) || exit 1; \
	  set -- $$lrs; for m in $$arms; do rates="$$rates lr_by_rank.r$(2).$$m=$$1"; shift; done; \
	fi; \
	echo "Table 1's rates for $(1) at r = $(2) (the rule on the grid runs under $(or $(3),$(FT_LR_FROM))):$$rates"
endef

# One task's learning-rate search at the ranks $(2) (default both): every grid of the rank's preset at seed 0, the
# methods sharing a grid in one multirun (so the JOBS workers stay busy); then each arm's choice beside the
# committed grid's. FFT, rank-free, is in the r = 8 preset's grids.
define FT_LR_GRID
	for r in $(or $(2),$(FT_RANKS)); do \
	  grids=$$($(PY) experiments/lr_grid.py --by-grid --only "$(FT_ONLY)" experiment=finetune_r$$r task=$(1)) || exit 1; \
	  echo "$$grids" | while read -r methods lrs; do \
	    $(FINETUNE) experiment=finetune_r$$r task=$(1) method=$$methods lr=$$lrs seed=0 </dev/null || exit 1; done || exit 1; \
	done
	@for r in $(or $(2),$(FT_RANKS)); do \
	  $(call FT_CHOSEN_RATES,$(1),$$r,results/runs); here=$$rates; \
	  $(call FT_CHOSEN_RATES,$(1),$$r,tests/fixtures/measured); \
	  [ "$$here" = "$$rates" ] || echo "this grid chose other rates than the committed one at r = $$r: run make with FT_LR_FROM=results/runs"; \
	done
endef

# One task's Table 1 arms at their chosen rates, seeds 0 and FT_SEEDS: one multirun per rank (lr null: each
# method's rate is its lr_by_rank entry, set here to the chosen one)
define FT_TABLE1
	for r in 8 256; do \
	  $(call FT_CHOSEN_RATES,$(1),$$r); \
	  [ -z "$$methods" ] || $(FINETUNE) experiment=finetune_r$$r task=$(1) method=$$methods $$rates seed=0,$(FT_SEEDS) || exit 1; \
	done
endef

## Table 1's learning-rate searches, one target per task: every arm's grid at seed 0 into results/runs/; prints each
## arm's choice beside the committed grid's. Each also comes in one part per rank, table1-<column>-lr-grid-r8 (FFT
## and the adapters at r = 8) and -r256, for the 30-min wall clock (issue 12): biomedicine's whole grid, 40 runs of
## about 90 s each on an idle core (190 s on a slower afternoon), is 30 min or more on the 2 cores.
FT_TASK_OF_instruct := tulu
FT_TASK_OF_math     := metamath
FT_TASK_OF_biomed   := biomed
FT_LR_GRID_PARTS    := $(foreach column,instruct math biomed,$(foreach r,$(FT_RANKS),table1-$(column)-lr-grid-r$(r)))
.PHONY: $(FT_LR_GRID_PARTS)
table1-instruct-lr-grid: $(STAMP)
	$(call FT_LR_GRID,tulu)
table1-math-lr-grid: $(STAMP)
	$(call FT_LR_GRID,metamath)
table1-biomed-lr-grid: $(STAMP)
	$(call FT_LR_GRID,biomed)
# a part's column and rank from its name: table1-<column>-lr-grid-r<rank>
$(FT_LR_GRID_PARTS): $(STAMP)
	$(call FT_LR_GRID,$(FT_TASK_OF_$(word 2,$(subst -, ,$@))),$(patsubst r%,%,$(lastword $(subst -, ,$@))))
table1-lr-grid: table1-instruct-lr-grid table1-math-lr-grid table1-biomed-lr-grid

## Table 1, instruction-tuning column (mini: an Alpaca sample stands in for Tülu v2; held-out response NLL): each arm
## at the rate its grid chose (FT_LR_FROM), seeds 0, 1, 2 (the same for the two columns below)
table1-instruct: $(STAMP)
	$(call FT_TABLE1,tulu)
	$(FT_REPORT)

## Table 1, mathematical-reasoning column (mini: GSM8K train in MetaMath's style; GSM8K test)
table1-math: $(STAMP)
	$(call FT_TABLE1,metamath)
	$(FT_REPORT)

## Table 1, continual-pretraining column (mini: PubMedQA abstracts via AdaptLLM; PubMedQA + abstract perplexity)
table1-biomed: $(STAMP)
	$(call FT_TABLE1,biomed)
	$(FT_REPORT)

## Table 1: every method at r = 8 and 256 on the three mini tasks (the three targets above)
table1: table1-instruct table1-math table1-biomed

## Table 4: MoRA's four compress/decompress operators (Eqs. 4, 6, 8, 9) at r = 8 and 256 on GSM8K, each rank at
## MoRA's Table 1 rate for that rank (analysis best-lr on FT_LR_FROM's grid; Table 1's rotate r = 8 and share
## r = 256 runs are two of its cells, shared with table1-math when both run). It needs no other Table 1 run, so it
## does not run table1-math first: 24 runs, the report shows the Table 1 rows present
table4: $(STAMP)
	for r in 8 256; do \
	  op=$$($(PY) experiments/config_value.py method.operator experiment=finetune_r$$r task=metamath) || exit 1; \
	  lr=$$($(PY) -m analysis best-lr --task metamath --runs $(FT_LR_FROM) --method mora --rank $$r --where method.operator=$$op) \
	    || exit 1; \
	  $(FINETUNE) experiment=finetune_r$$r task=metamath method=mora method.operator=truncate,share,decouple,rotate lr=$$lr seed=0,$(FT_SEEDS) || exit 1; \
	done
	$(FT_REPORT)

## Table 6: FFT, LoRA and MoRA at r = 8 and 256 on biomedicine: Table 1's biomedicine runs (mini: PubMedQA-L;
## Table 7, finance, is paper-only)
table6: table1-biomed
	$(FT_REPORT)

## Table 7 (finance) exists at paper scale only: no financial text is available offline, so at mini
## this stops at once and says so (scale=paper on GPUs: see launch/README.md)
table7: $(STAMP)
	$(PY) experiments/run.py experiment=finetune_r8 task=finance method=fft

finetune: table1 table4 table6

# ---- Calibration of the mini presets from the baselines only (issue 12; the rules: docs/calibration.md)

## fine-tuning calibration (docs/calibration.md, Amendment 6): FFT and LoRA (r = 8 and 256) at seed 0 on the ladder
## {1, 3} x 10^k, per task, into results/runs/ (Table 1 reuses them); reports/calibration_finetune/
FT_TASKS        ?= metamath tulu biomed
CAL_FT_FFT_LR   ?= 1e-3,3e-3,1e-2
CAL_FT_LORA_LR  ?= 1e-2,3e-2,1e-1
calibrate-finetune: $(STAMP)
	for t in $(FT_TASKS); do \
	  $(FINETUNE) experiment=finetune_r8 task=$$t method=fft lr=$(CAL_FT_FFT_LR) seed=0 || exit 1; \
	  $(FINETUNE) experiment=finetune_r8,finetune_r256 task=$$t method=lora lr=$(CAL_FT_LORA_LR) seed=0 || exit 1; \
	done
	$(PY) -m analysis finetune-calibration --runs results/runs --out reports/calibration_finetune

## UUID: FFT and LoRA r = 8, 256 (no MoRA) at seed 0 over pairs x learning-rate grid, batch = pairs / 4
## (0.25 epochs per step at every N), into results/calibrate_uuid/pairs<N>/; reports/calibration/calibration_uuid.md
## (36 runs, ~24 min on 2 cores). Refresh the copy the docs' report is checked against with
## python -m analysis.snapshot --runs results/calibrate_uuid --out tests/fixtures/calibration_uuid --scale mini
CAL_PAIRS    ?= 16 32 64 128
CAL_FFT_LR   ?= 1e-3,3e-3,1e-2
CAL_LORA_LR  ?= 3e-3,1e-2,3e-2
CAL_UUID     := $(FINETUNE) experiment=uuid_memory seed=0
calibrate-uuid: $(STAMP)
	for n in $(CAL_PAIRS); do \
	  opts="task.n_pairs=$$n train.batch_size=$$((n / 4)) out_root=results/calibrate_uuid/pairs$$n"; \
	  $(CAL_UUID) method=fft lr=$(CAL_FFT_LR) $$opts || exit 1; \
	  $(CAL_UUID) method=lora rank=8,256 lr=$(CAL_LORA_LR) $$opts || exit 1; \
	done
	$(PY) -m analysis calibrate-uuid --runs results/calibrate_uuid --out reports/calibration

## UUID round 2 (docs/calibration.md, Amendment 1): the paper's epochs at every evaluation, batch = 0.3 N
## (0.3 epochs per step), evaluations at 100/167/233/300 (the paper's 300/500/700/900), N in the order
## 40 80 120 20, into results/calibrate_uuid_r2/pairs<N>/; reports/calibration_r2/calibration_uuid.md.
## Refresh the docs' copy with
## python -m analysis.snapshot --runs results/calibrate_uuid_r2 --out tests/fixtures/calibration_uuid_r2 --scale mini
CAL2_PAIRS   ?= 40 80 120 20
CAL2_EVALS   ?= [100,167,233,300]
# $(call cal_uuid_epochs,<extra overrides>,<out root>[,<pairs>]): Amendment 1's grid (batch = 0.3 N) over the
# numbers of pairs given (default CAL2_PAIRS)
cal_uuid_epochs = for n in $(or $(3),$(CAL2_PAIRS)); do \
	  opts="$(1) task.n_pairs=$$n train.batch_size=$$((n * 3 / 10)) train.eval_steps=$(CAL2_EVALS) out_root=$(2)/pairs$$n"; \
	  $(CAL_UUID) method=fft lr=$(CAL_FFT_LR) $$opts || exit 1; \
	  $(CAL_UUID) method=lora rank=8,256 lr=$(CAL_LORA_LR) $$opts || exit 1; \
	done
calibrate-uuid-epochs: $(STAMP)
	$(call cal_uuid_epochs,,results/calibrate_uuid_r2)
	$(PY) -m analysis calibrate-uuid --runs results/calibrate_uuid_r2 --out reports/calibration_r2

## UUID round 3 (docs/calibration.md, Amendment 2): round 2 on the wider base stories_w128 (built first by
## `make base`), into results/calibrate_uuid_r3/pairs<N>/; reports/calibration_r3/calibration_uuid.md.
## In one part per number of pairs for the 30-min wall clock (issue 12; 35.7 min as one on the AMD EPYC):
## calibrate-uuid-base-pairs<N> (9 runs each), each writing the report of the runs so far; calibrate-uuid-base runs
## them in CAL2_PAIRS' order. Refresh the docs' copy with
## python -m analysis.snapshot --runs results/calibrate_uuid_r3 --out tests/fixtures/calibration_uuid_r3 --scale mini
CAL_UUID_BASE_PARTS := $(foreach n,$(CAL2_PAIRS),calibrate-uuid-base-pairs$(n))
.PHONY: $(CAL_UUID_BASE_PARTS)
calibrate-uuid-base: $(CAL_UUID_BASE_PARTS)
# a part's number of pairs from its name: calibrate-uuid-base-pairs<N>
$(CAL_UUID_BASE_PARTS): base
	$(call cal_uuid_epochs,model=stories_w128,results/calibrate_uuid_r3,$(@:calibrate-uuid-base-pairs%=%))
	$(PY) -m analysis calibrate-uuid --runs results/calibrate_uuid_r3 --out reports/calibration_r3

## the wider mini base (docs/calibration.md, Amendment 2): stories260K's shape at width 128, pretrained here
## once from the offline text into bases/stories_w128/ (deterministic; ~4 min on 2 threads)
base: $(STAMP)
	$(PY) experiments/build_base.py --model stories_w128

## why LoRA ends below FFT in the first mini C4 preset (docs/calibration.md): FFT and LoRA r=128 at seed 0 under a
## finer FFT lr grid, 4x the steps, and LoRA with embeddings/norms/head frozen; reports/c4_diagnosis/c4_diagnosis.md.
## In two parts for the 30-min wall clock (issue 12; about 61 min as one on a shared AMD EPYC), each writing the
## report of the runs so far: c4-diagnosis-rates (the preset's length: FFT's finer grid, LoRA, LoRA with frozen
## embeddings; 7 runs) and c4-diagnosis-steps (FFT and LoRA at 4x the steps; 2 runs); c4-diagnosis runs both
C4_DIAG        := $(FINETUNE) experiment=pretrain_c4_first_mini seed=0
C4_DIAG_REPORT := $(PY) -m analysis c4-diagnosis --runs results/c4_diagnosis --out reports/c4_diagnosis
.PHONY: c4-diagnosis-rates c4-diagnosis-steps
c4-diagnosis: c4-diagnosis-rates c4-diagnosis-steps
c4-diagnosis-rates: $(STAMP)
	$(C4_DIAG) method=fft lr=1e-3,2e-3,3e-3,5e-3,1e-2 out_root=results/c4_diagnosis/preset
	$(C4_DIAG) method=lora lr=3e-3 out_root=results/c4_diagnosis/preset
	$(C4_DIAG) method=lora lr=3e-3 'method.trainable_modules=[]' out_root=results/c4_diagnosis/frozen_embeddings
	$(C4_DIAG_REPORT)
c4-diagnosis-steps: $(STAMP)
	$(C4_DIAG) method=fft,lora lr=3e-3 train.max_steps=1600 train.warmup_steps=160 \
	  'train.eval_steps=[200,400,600,800,1000,1200,1400,1600]' out_root=results/c4_diagnosis/steps1600
	$(C4_DIAG_REPORT)

# ---- Everything

## every table and figure at mini scale from a fresh clone, offline: reports/{uuid,pretrain,finetune}/
# everything from nothing: the C4 and fine-tuning tables at the rates of this clone's own grids
all: C4_LR_FROM = results/runs
all: FT_LR_FROM = results/runs
all: uuid c4-lr-grid pretrain table1-lr-grid finetune

## copy the mini run folders behind the README's numbers (no checkpoints) into tests/fixtures/measured/,
## where the suite re-renders every notebook from them and checks the README's numbers
snapshot: $(STAMP)
	$(PY) -m analysis.snapshot --runs results/runs --out tests/fixtures/measured --scale mini

## is each mini experiment in the paper's regime? one table per experiment from the presets, the models
## they build and the runs in results/runs: reports/regime/regime.md (the README's copy reads the snapshot)
regime: $(STAMP)
	$(PY) -m analysis regime --runs results/runs --out reports/regime

## the README's figures (Fig. 2-5, the Table 1 bars) as PNGs in docs/figures/, drawn from the saved runs behind
## its numbers (RUNS=results/runs: from yours); tests/test_figures.py fails when a committed one is stale (~15 s)
RUNS ?= tests/fixtures/measured
figures: $(STAMP)
	$(PY) -m analysis figures --runs $(RUNS) --out docs/figures

clean:
	rm -rf $(VENV) .pytest_cache results/bench

# ---- The paper path, rehearsed on CPU against local stand-ins of the hub (rehearsal/README.md)

## every scale=paper preset (UUID, Tülu, MetaMath, biomedicine, finance, C4 250M and 1.3B) with every method, a few
## optimizer steps through experiments/run.py, offline (HF_HUB_OFFLINE=1) with HF_HOME at stand-ins built from data/;
## every lm-eval task of the paper tables on 2 documents, ReLoRA/ReMoRA merges, a killed run resumed, eval.py --merge.
## Prints a pass/fail table with wall times. REHEARSAL_ARGS: e.g. --only c4_paper, --keep, --work DIR
REHEARSAL_ARGS ?=
.PHONY: rehearse-paper
rehearse-paper: $(STAMP)
	$(PY) -m rehearsal $(REHEARSAL_ARGS)
