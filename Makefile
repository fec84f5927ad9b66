# HASS Studio. `make demo` sets everything up and starts the studio; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-cache browser space-check race-check

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt tools/install.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	sh tools/install.sh $(BIN)/python dev
	touch $(STAMP)

demo: setup
	$(BIN)/python app.py $(ARGS)

# Test files are spread over TEST_WORKERS processes (whole files per worker, so module
# fixtures load once); every test runs torch on one thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The browser tests drive Debian's chromium (never a downloaded browser build).
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "note: install Debian's chromium (apt-get install chromium) for the browser tests"

# The Space's build and start, offline: a fresh venv from tools/install.sh (runtime only),
# SPACE_ID set, app.py started, one chat answered through gradio_client, then stopped (~4 min).
space-check: setup
	$(BIN)/python tools/space_check.py

# The studio's race of plain vs HASS as a new user meets it: an empty HASS_CACHE, Chromium
# clicking the Race tab, the verdicts read off the page (runs/race-check.json)
# (RACE_FLAGS: e.g. "--temperature 1 --runs 1"; RACE_OUT: the JSON written)
RACE_PROMPT ?= Explain in three sentences why the sky is blue.
RACE_OUT ?= runs/race-check.json
race-check: setup browser
	$(BIN)/python tools/race_check.py --prompt "$(RACE_PROMPT)" --out $(RACE_OUT) $(RACE_FLAGS)

clean-cache:
	rm -rf $${HASS_CACHE:-$$HOME/.cache/hass-studio}/models

# -- the shipped drafts (long: hours on a CPU; every step resumes) -------------------------
DATA ?= $${HASS_CACHE:-$$HOME/.cache/hass-studio}/data
PREP_LIMIT ?= 578
MAX_LEN ?= 1024
TRAIN_FLAGS ?= --draft-vocab 8192 --lr 1e-3 --warmup 0.02 --batch-size 4 --threads 1
EPOCHS ?= 3
DRAFTS := assets/drafts
RUNS := runs/drafts

BENCH_LIMIT ?= 5
BENCH_NOTE ?=

# docs/BENCHMARKS.md and its plots, from one full run (run it on an otherwise idle machine)
benchmarks: setup
	$(BIN)/python -m hass bench --limit $(BENCH_LIMIT) --max-new-tokens 128 --temperature 0 1 --out runs/bench --note "$(BENCH_NOTE)" \
		--methods plain,plain-stock,hass,hass-draft,lookup,eagle2,hf-generate,hf-prompt-lookup
	$(BIN)/python -m visual.report runs/bench/bench.json --png-dir docs/benchmarks --markdown docs/BENCHMARKS.md

# docs/BENCHMARKS.md as a new user meets it: an empty HASS_CACHE (the model converted, the cost
# curve measured on first use, no tuned profile), no tree flags, the issues' three sets
FRESH_BENCH_METHODS ?= plain,hass,hass-draft,lookup,hass-rejection,hf-prompt-lookup
benchmarks-fresh: setup
	fresh=$$(mktemp -d) && HASS_CACHE=$$fresh $(BIN)/python -m hass bench --sets mt_bench,humaneval,gsm8k --limit 3 \
		--methods $(FRESH_BENCH_METHODS) --max-new-tokens 128 --temperature 0 1 --out runs/bench-fresh --note "fresh cache (an empty HASS_CACHE made by make benchmarks-fresh)$(if $(BENCH_NOTE), $(BENCH_NOTE))"; \
		status=$$?; rm -rf $$fresh; exit $$status
	$(BIN)/python -m visual.report runs/bench-fresh/bench.json --png-dir docs/benchmarks --markdown docs/BENCHMARKS.md

# docs/GPU.md, from a bench run on a CUDA machine kept in docs/gpu/bench.json (that run's command is
# in it; `tools/gpu_check.sh` runs it with the other GPU checks, ~10 min on one H200)
GPU_TITLE ?= Benchmarks on a GPU (one NVIDIA H200, fp32)
gpu-doc: setup
	$(BIN)/python -m visual.report docs/gpu/bench.json --html runs/gpu-report.html --markdown docs/GPU.md --title "$(GPU_TITLE)"

# docs/BENCHMARKS-AVX2.md: the issues' bench (fresh cache, no tree flags, T = 0 and 1) on a CPU with
# AVX2 only (no AVX-512, no native bf16; the class a free Space may be given), from the run's JSON
# kept in docs/avx2/bench.json, with plain decoding on oneDNN's kernels beside the default rows
# kernel's. Refuses to run on another CPU class: the page is about this one.
AVX2_TITLE ?= Benchmarks on a CPU with AVX2 only (no AVX-512, no native bf16)
avx2-doc: setup
	$(BIN)/python -c 'import sys; from hass.device import cpu_description as d; s = d(); \
		sys.exit(0 if "AVX2, no AVX-512" in s else "not an AVX2-only CPU: " + s)'
	fresh=$$(mktemp -d) && HASS_CACHE=$$fresh $(BIN)/python -m hass bench --sets mt_bench,humaneval,gsm8k --limit 3 \
		--methods plain,hass,hf-prompt-lookup,plain-onednn --max-new-tokens 128 --temperature 0 1 --out runs/bench-avx2 \
		--no-report --note "fresh cache (an empty HASS_CACHE made by make avx2-doc)"; \
		status=$$?; rm -rf $$fresh; exit $$status
	mkdir -p docs/avx2 && cp runs/bench-avx2/bench.json docs/avx2/bench.json
	$(BIN)/python -m visual.report docs/avx2/bench.json --html runs/avx2-report.html --markdown docs/BENCHMARKS-AVX2.md --title "$(AVX2_TITLE)"

# The same at the product's settings on prompts nothing was tuned or decided on: questions 4-6
# of each set (`--skip 3`) -> docs/BENCHMARKS-UNSEEN.md
benchmarks-unseen: setup
	fresh=$$(mktemp -d) && HASS_CACHE=$$fresh $(BIN)/python -m hass bench --sets mt_bench,humaneval,gsm8k --skip 3 --limit 3 \
		--methods plain,hass,hf-prompt-lookup --max-new-tokens 128 --temperature 0 1 --out runs/bench-unseen --no-report \
		--note "fresh cache (an empty HASS_CACHE made by make benchmarks-unseen); questions 4-6 of each set"; \
		status=$$?; rm -rf $$fresh; exit $$status
	$(BIN)/python -m visual.report runs/bench-unseen/bench.json --markdown docs/BENCHMARKS-UNSEEN.md \
		--title "Benchmarks on questions never used to tune anything"

# docs/BATCH.md, written by the batch command from the JSON it keeps (runs/batch/batch.json)
EVAL := ../shared/data/eval
batch-doc: setup
	$(BIN)/python -m hass batch --prompts-file $(EVAL)/mt_bench.jsonl $(EVAL)/humaneval.jsonl $(EVAL)/gsm8k.jsonl \
		--limit 11 --max-prompts 32 --method sequential,ems,padded --batch-size 4,8 --max-new-tokens 64 --warmup \
		--out runs/batch --markdown docs/BATCH.md

.PHONY: benchmarks benchmarks-fresh benchmarks-unseen batch-doc gpu-doc avx2-doc curve prepare drafts draft-hass draft-eagle2 eval-drafts prepare-2 drafts-2 draft-hass-2 draft-eagle2-2

prepare: setup
	$(BIN)/python -m hass prepare --out $(DATA)/sharegpt-train-$(MAX_LEN) --limit $(PREP_LIMIT) --max-len $(MAX_LEN)
	$(BIN)/python -m hass prepare --out $(DATA)/sharegpt-heldout-$(MAX_LEN) --split held-out --limit 64 --max-len $(MAX_LEN)

draft-hass: setup
	$(BIN)/python -m hass train --data $(DATA)/sharegpt-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-hass \
		--align-steps 3 --topk-weight 1.0 --epochs $(EPOCHS) $(TRAIN_FLAGS) --snapshots $(RESUME)

# tau of every HASS snapshot (docs/TRAINING.md's table; snapshot steps follow the checkpoint clock)
curve: setup
	$(BIN)/python -m hass curve --run $(RUNS)/smollm2-135m-hass --questions 5 --max-new-tokens 96

draft-eagle2: setup
	$(BIN)/python -m hass train --data $(DATA)/sharegpt-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-eagle2 \
		--align-steps 1 --topk-weight 0.0 --epochs $(EPOCHS) $(TRAIN_FLAGS) $(RESUME)

drafts: prepare
	$(MAKE) -j2 draft-hass draft-eagle2
	$(MAKE) eval-drafts

eval-drafts: setup
	for d in hass eagle2; do \
		$(BIN)/python -m hass eval-draft --draft $(RUNS)/smollm2-135m-$$d$(STAGE) --heldout $(DATA)/sharegpt-heldout-$(MAX_LEN) \
			--questions 10 --out $(RUNS)/smollm2-135m-$$d$(STAGE)/eval.json && \
		$(BIN)/python -m hass card --draft $(RUNS)/smollm2-135m-$$d$(STAGE) --out $(DRAFTS)/smollm2-135m-$$d \
			--data $(DATA)/sharegpt-train-$(MAX_LEN) \
			--title "SmolLM2-135M-Instruct $$d draft" --command "$(CARD_COMMAND)"; \
	done
CARD_COMMAND ?= make drafts EPOCHS=$(EPOCHS)

# Stage 2 (the shipped drafts): more dialogues, then both stage-1 drafts continued for one
# more epoch with the same settings for both (the token map stays stage 1's).
PREP2_LIMIT ?= 2000
STAGE2_FLAGS ?= --lr 5e-4 --warmup 0.02 --batch-size 4 --threads 1 --epochs 1

prepare-2: setup
	$(BIN)/python -m hass prepare --out $(DATA)/sharegpt-train-$(MAX_LEN) --limit $(PREP2_LIMIT) --max-len $(MAX_LEN)

draft-hass-2: setup
	$(BIN)/python -m hass train --data $(DATA)/sharegpt-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-hass-2 \
		--init $(RUNS)/smollm2-135m-hass --align-steps 3 --topk-weight 1.0 $(STAGE2_FLAGS) --snapshots $(RESUME)

draft-eagle2-2: setup
	$(BIN)/python -m hass train --data $(DATA)/sharegpt-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-eagle2-2 \
		--init $(RUNS)/smollm2-135m-eagle2 --align-steps 1 --topk-weight 0.0 $(STAGE2_FLAGS) $(RESUME)

drafts-2: prepare-2
	$(MAKE) -j2 draft-hass-2 draft-eagle2-2
	$(MAKE) eval-drafts STAGE=-2 CARD_COMMAND="make drafts && make drafts-2"

# -- self-distilled data (issue: drafts that predict the target's own text; hours on a CPU, resumable) --
# The held-out dialogues first (small; the evaluation needs them), then the training ones;
# every command resumes where a stopped run ended (Ctrl-C / kill keep every answered turn).
# The answers are kept in the repo (assets/distill/, text) so that runs of several sessions
# add up: commit them after a run.
DISTILL_DIR ?= assets/distill
DISTILL_LIMIT ?= 4000
DISTILL_FLAGS ?=

.PHONY: prepare-3-ctl draft-hass-3-ctl distill distill-measure drafts-3 draft-hass-3 draft-eagle2-3 eval-shipped eval-full-vocab
distill: setup
	$(BIN)/python -m hass distill --out $(DISTILL_DIR)/heldout.jsonl --split held-out --limit 32 $(DISTILL_FLAGS)
	$(BIN)/python -m hass distill --out $(DISTILL_DIR)/train.jsonl --limit $(DISTILL_LIMIT) $(DISTILL_FLAGS)
	$(MAKE) prepare-3

# the distilled held-out dialogues every continuation stage is evaluated on
prepare-distill-heldout: setup
	$(BIN)/python -m hass prepare --data $(DISTILL_DIR)/heldout.jsonl --split held-out --out $(DATA)/distill-heldout-$(MAX_LEN) --max-len $(MAX_LEN)

prepare-3: prepare-distill-heldout
	$(BIN)/python -m hass prepare --data $(DISTILL_DIR)/train.jsonl --out $(DATA)/distill-train-$(MAX_LEN) --max-len $(MAX_LEN)

# tokens/s of batched generation per batch size on this machine (docs/TRAINING.md's table)
distill-measure: setup
	$(BIN)/python -m hass distill --measure 1,8,16,32,64
	$(BIN)/python -m hass distill --measure-engines 16

# Stage 3: both shipped (stage-2) drafts continued on the self-distilled data, same settings
# and steps for both; evaluated on distilled held-out dialogues; shipped only if better
# (`make ship-drafts-3` after reading the eval tables).
STAGE3_FLAGS ?= --lr 1e-4 --warmup 0.02 --batch-size 4 --threads 1 --epochs 1

draft-hass-3: setup
	$(BIN)/python -m hass train --data $(DATA)/distill-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-hass-3 \
		--init $(DRAFTS)/smollm2-135m-hass --align-steps 3 --topk-weight 1.0 $(STAGE3_FLAGS) --snapshots $(RESUME)

draft-eagle2-3: setup
	$(BIN)/python -m hass train --data $(DATA)/distill-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-eagle2-3 \
		--init $(DRAFTS)/smollm2-135m-eagle2 --align-steps 1 --topk-weight 0.0 $(STAGE3_FLAGS) $(RESUME)

drafts-3: prepare-3
	$(MAKE) -j2 draft-hass-3 draft-eagle2-3
	$(MAKE) eval-drafts-3

# the control of stage 3: the same prompts with ShareGPT's original answers, HASS trained
# with the same settings and steps (does the target's own text teach more per token?)
prepare-3-ctl: setup
	$(BIN)/python -m hass prepare --same-as $(DISTILL_DIR)/train.jsonl --out $(DATA)/distill-ctl-train-$(MAX_LEN) --max-len $(MAX_LEN)

draft-hass-3-ctl: setup
	$(BIN)/python -m hass train --data $(DATA)/distill-ctl-train-$(MAX_LEN) --out $(RUNS)/smollm2-135m-hass-3-ctl \
		--init $(DRAFTS)/smollm2-135m-hass --align-steps 3 --topk-weight 1.0 $(STAGE3_FLAGS) $(RESUME)

# bf16 features against fp32 ones: the distilled held-out dialogues prepared in both precisions
# into fresh folders, one after the other (each prepare's log line gives its tokens/s), then how
# far the two differ and the shipped drafts' held-out accuracy on each (docs/TRAINING.md)
.PHONY: features-bf16-check
features-bf16-check: setup
	for dt in fp32 bf16; do rm -rf $(DATA)/heldout-check-$$dt; \
		$(BIN)/python -m hass prepare --data $(DISTILL_DIR)/heldout.jsonl --split held-out \
			--out $(DATA)/heldout-check-$$dt --max-len $(MAX_LEN) --dtype $$dt || exit 1; done
	$(BIN)/python -m hass compare-features $(DATA)/heldout-check-fp32 $(DATA)/heldout-check-bf16 \
		--out $(RUNS)/features-bf16.json

# the issues' tau protocol: first turns of the first 4 MT-bench, 3 HumanEval and 3 GSM8K
# questions, tree 60/6/10, 128 new tokens, T = 0 and T = 1 (seed = prompt index)
TAU_FLAGS ?= --questions 4,3,3 --total-tokens 60 --depth 6 --top-k 10 --max-new-tokens 128 --temperature 0 1

# the shipped drafts and the stage-3 runs, evaluated the same way (held-out accuracy on the
# distilled held-out dialogues)
eval-shipped: setup
	for d in hass eagle2; do \
		$(BIN)/python -m hass eval-draft --draft $(DRAFTS)/smollm2-135m-$$d --heldout $(DATA)/distill-heldout-$(MAX_LEN) \
			$(TAU_FLAGS) --out $(RUNS)/shipped-$$d-eval.json; \
	done

# tau of EAGLE-2's cut at four tree sizes and the ceiling of the candidates (`hass replay`, the
# issues' 4 + 3 + 3 prompts, growth 6/10), for both shipped drafts at T = 0 and T = 1 (coupled
# sampling; ~2.5 min per draft and temperature on a CPU)
.PHONY: replay-shipped
REPLAY_TEMPERATURES ?= 0 1
replay-shipped: setup
	for d in hass eagle2; do for t in $(REPLAY_TEMPERATURES); do \
		$(BIN)/python -m hass replay --draft $$d --temperature $$t --out $(RUNS)/replay-shipped-$$d-t$$t.json || exit 1; \
	done; done

# knob 4: the shipped HASS draft over the whole vocabulary instead of its 8k token map
eval-full-vocab: setup
	$(BIN)/python -m hass eval-draft --draft $(DRAFTS)/smollm2-135m-hass --full-vocab $(TAU_FLAGS) \
		--out $(RUNS)/shipped-hass-full-vocab.json

SHIP ?= hass eagle2

# Stages 4, 5 and 6: the shipped drafts continued on ShareGPT dialogues no stage has seen, same
# settings and steps for both drafts; stage N takes the split's dialogues
# [PREPN_SKIP, PREPN_SKIP + PREPN_LIMIT) (stage 4 after the first 2000 that stages 1-2 were
# prepared from, stage 5 after stage 4's, stage 6 after stage 5's), continues the drafts in
# $(DRAFTS) (the shipped ones: stage 4 started from stage 3's, stage 5 from stage 4's), is
# evaluated like stage 3 (`make eval-drafts-N`) and shipped only if better (`make
# ship-drafts-N`). PREPN_LIMIT is the number of dialogues (kept and skipped) the run took (a
# prepare stopped early keeps its finished shards: stage 5's was stopped after 2,196).
# PREPN_DTYPE: the target's precision for the features (unset = fp32 on a CPU); stage 6 takes
# bf16 where the CPU computes it natively (bf16-if-native: 1.5-1.7x faster there, features the
# fp32-trained drafts cannot tell apart, `make features-bf16-check`, docs/TRAINING.md; stage 6
# is the first training run on them) and fp32 on AVX2-only CPUs, where bf16 is emulated.
PREP4_SKIP ?= 2000
PREP4_LIMIT ?= 3281
PREP5_SKIP ?= 5281
PREP5_LIMIT ?= 2196
PREP6_SKIP ?= 7477
PREP6_LIMIT ?= 2000
PREP6_DTYPE ?= bf16-if-native
STAGE4_FLAGS ?= --lr 3e-4 --warmup 0.02 --batch-size 4 --threads 2 --epochs 1
STAGE5_FLAGS ?= $(STAGE4_FLAGS)
# Stage 6 also gives both drafts a new token map (issue 11's knob 4): 16,384 tokens ranked on the
# assistant turns of the whole ShareGPT train split (10.5M tokens, counted in seconds), where the
# shipped 8,192 were ranked on stage 1's 285k (eval-draft reports each map's coverage of the
# target's greedy tokens: docs/TRAINING.md). The draft's weights do
# not depend on its map; `draft-eagle2-6-8k` is the control (the same run with the shipped map).
# Measured: level with the control on held-out accuracy, tau and speed at 1.5x the training time,
# so a next stage goes back to the 8k map (docs/TRAINING.md, stage 6).
STAGE6_VOCAB ?= --draft-vocab 16384 --vocab-data sharegpt
STAGE6_FLAGS ?= $(STAGE4_FLAGS) $(STAGE6_VOCAB)
# Stage 7: the dialogues after stage 6's, bf16 features, continuing the stage-6 runs (the most
# accurate drafts measured; not shipped) with an 8k map ranked on ShareGPT. The split holds 1,426
# dialogues after stage 6's: stage 7 takes them all, and the ShareGPT train split is then used up.
# Besides HASS continued from HASS (draft-hass-7), draft-hass-7e trains HASS's losses from the
# stage-6 EAGLE-2 draft (the authors' two stages: first without HASS's objectives, then with):
# measured the best at T = 0 and shipped with draft-eagle2-7 (`make ship-drafts-7`), the two
# sharing their start, data and steps (docs/TRAINING.md, stage 7).
PREP7_SKIP ?= 9477
PREP7_LIMIT ?= 1426
PREP7_DTYPE ?= bf16-if-native
STAGE7_FLAGS ?= $(STAGE4_FLAGS) --draft-vocab 8192 --vocab-data sharegpt
STAGE7_INIT_HASS ?= $(RUNS)/smollm2-135m-hass-6
STAGE7_INIT_EAGLE2 ?= $(RUNS)/smollm2-135m-eagle2-6
STAGE7_DATA = $(DATA)/sharegpt-7-$(MAX_LEN)
STAGE7_BENCH = --draft hass7e=$(RUNS)/smollm2-135m-hass-7e
STAGE4_DATA = $(DATA)/sharegpt-new-$(MAX_LEN)
STAGE5_DATA = $(DATA)/sharegpt-5-$(MAX_LEN)
STAGE6_DATA = $(DATA)/sharegpt-6-$(MAX_LEN)

# pattern rules for stages 4 to 7 (a stage's --init is the shipped draft unless STAGEN_INIT_* names
# another; explicit rules of stages 2 and 3 take precedence);
# .SECONDARY keeps make from treating prepare-N as an intermediate file to delete
.SECONDARY: prepare-4 prepare-5 prepare-6 prepare-7
prepare-%: prepare-distill-heldout
	$(BIN)/python -m hass prepare --out $(STAGE$*_DATA) --skip $(PREP$*_SKIP) --limit $(PREP$*_LIMIT) --max-len $(MAX_LEN) \
		$(if $(PREP$*_DTYPE),--dtype $(PREP$*_DTYPE))

draft-hass-%: setup
	$(BIN)/python -m hass train --data $(STAGE$*_DATA) --out $(RUNS)/smollm2-135m-hass-$* \
		--init $(or $(STAGE$*_INIT_HASS),$(DRAFTS)/smollm2-135m-hass) --align-steps 3 --topk-weight 1.0 $(STAGE$*_FLAGS) --snapshots $(RESUME)

draft-eagle2-%: setup
	$(BIN)/python -m hass train --data $(STAGE$*_DATA) --out $(RUNS)/smollm2-135m-eagle2-$* \
		--init $(or $(STAGE$*_INIT_EAGLE2),$(DRAFTS)/smollm2-135m-eagle2) --align-steps 1 --topk-weight 0.0 $(STAGE$*_FLAGS) $(RESUME)

# one after the other, two threads each (the machine's two cores; faster in all than one each in parallel)
drafts-%: prepare-%
	$(MAKE) draft-hass-$*
	$(MAKE) draft-eagle2-$*
	$(MAKE) eval-drafts-$*

# stage 6: both drafts with the new map, evaluated; then the control (EAGLE-2 with the shipped
# 8k map: what the new map buys at equal data and steps), evaluated the same way
.PHONY: draft-eagle2-6-8k eval-eagle2-6-8k bench-drafts-6
drafts-6: prepare-6
	$(MAKE) draft-hass-6
	$(MAKE) draft-eagle2-6
	$(MAKE) eval-drafts-6
	$(MAKE) draft-eagle2-6-8k
	$(MAKE) eval-eagle2-6-8k

# the stage-6 drafts at the product's settings (fresh cache, no tree flags: fitted trees with
# lookup), side by side with the shipped HASS draft, plain decoding and prompt lookup
bench-drafts-6: setup
	fresh=$$(mktemp -d) && HASS_CACHE=$$fresh $(BIN)/python -m hass bench --sets mt_bench,humaneval,gsm8k --limit 3 \
		--methods plain,hass,hf-prompt-lookup --draft hass6=$(RUNS)/smollm2-135m-hass-6 \
		--draft eagle2-6=$(RUNS)/smollm2-135m-eagle2-6 --draft eagle2-6-8k=$(RUNS)/smollm2-135m-eagle2-6-8k \
		--max-new-tokens 128 --temperature 0 1 --out runs/bench-drafts6 --note "fresh cache; stage-6 drafts beside the shipped stage-5 HASS"; \
		status=$$?; rm -rf $$fresh; exit $$status

# a continuation stage's two drafts at the product's settings (as bench-drafts-6), beside both
# shipped drafts, plain decoding and prompt lookup: what `make ship-drafts-N` is decided on
bench-drafts-%: setup
	fresh=$$(mktemp -d) && HASS_CACHE=$$fresh $(BIN)/python -m hass bench --sets mt_bench,humaneval,gsm8k --limit 3 \
		--methods plain,hass,hf-prompt-lookup --draft eagle2=$(DRAFTS)/smollm2-135m-eagle2 \
		--draft hass$*=$(RUNS)/smollm2-135m-hass-$* --draft eagle2-$*=$(RUNS)/smollm2-135m-eagle2-$* $(STAGE$*_BENCH) \
		--max-new-tokens 128 --temperature 0 1 --out runs/bench-drafts$* --note "fresh cache; stage-$* drafts beside the shipped ones"; \
		status=$$?; rm -rf $$fresh; exit $$status

# Stage 8 (measured in session 15, not shipped): the ShareGPT split is used up, so a second epoch
# over stage 6's folder, continuing the stage-7 pair with their own losses (EAGLE-2 from
# draft-eagle2-7, HASS from draft-hass-7e); the pattern's drafts-8, whose prepare-8 rebuilds stage
# 6's folder or finds it done (stage 9 likewise with stage 7's)
STAGE8_DATA = $(STAGE6_DATA)
PREP8_SKIP ?= $(PREP6_SKIP)
PREP8_LIMIT ?= $(PREP6_LIMIT)
PREP8_DTYPE ?= $(PREP6_DTYPE)
STAGE8_FLAGS ?= $(STAGE7_FLAGS)
STAGE8_INIT_HASS ?= $(RUNS)/smollm2-135m-hass-7e
STAGE8_INIT_EAGLE2 ?= $(RUNS)/smollm2-135m-eagle2-7

# Stage 9 (measured in session 15, not shipped): the second epoch over stage 7's folder, continuing stage 8's pair
STAGE9_DATA = $(STAGE7_DATA)
PREP9_SKIP ?= $(PREP7_SKIP)
PREP9_LIMIT ?= $(PREP7_LIMIT)
PREP9_DTYPE ?= $(PREP7_DTYPE)
STAGE9_FLAGS ?= $(STAGE7_FLAGS)
STAGE9_INIT_HASS ?= $(RUNS)/smollm2-135m-hass-8
STAGE9_INIT_EAGLE2 ?= $(RUNS)/smollm2-135m-eagle2-8

# Stage 10 (data prepared from session 15 on): a second epoch over stage 5's dialogues, whose
# folder is gone here, so prepared again (bf16 features, as stages 6-7), continuing stage 9's pair
PREP10_SKIP ?= $(PREP5_SKIP)
PREP10_LIMIT ?= $(PREP5_LIMIT)
PREP10_DTYPE ?= bf16-if-native
STAGE10_DATA = $(DATA)/sharegpt-10-$(MAX_LEN)
STAGE10_FLAGS ?= $(STAGE7_FLAGS)
STAGE10_INIT_HASS ?= $(RUNS)/smollm2-135m-hass-9
STAGE10_INIT_EAGLE2 ?= $(RUNS)/smollm2-135m-eagle2-9

# stage 7 = the pattern's stage plus the two-stage HASS run, evaluated; shipped as a pair
.PHONY: drafts-7 ship-drafts-7
drafts-7: prepare-7
	$(MAKE) draft-hass-7
	$(MAKE) draft-eagle2-7
	$(MAKE) eval-drafts-7
	$(MAKE) draft-hass-7e
	$(MAKE) eval-hass-7e

ship-drafts-7: setup
	$(BIN)/python -m hass card --draft $(RUNS)/smollm2-135m-hass-7e --out $(DRAFTS)/smollm2-135m-hass \
		--data $(STAGE7_DATA) --title "SmolLM2-135M-Instruct hass draft" --command "make drafts-7 && make ship-drafts-7"
	$(BIN)/python -m hass card --draft $(RUNS)/smollm2-135m-eagle2-7 --out $(DRAFTS)/smollm2-135m-eagle2 \
		--data $(STAGE7_DATA) --title "SmolLM2-135M-Instruct eagle2 draft" --command "make drafts-7 && make ship-drafts-7"

# stage 7's probe of the authors' two-stage recipe: HASS's losses (n = 3, w = 1) on stage 7's
# data, continuing the stage-6 EAGLE-2 draft (stages 1-6 as a first stage without HASS's
# objectives), so it and draft-eagle2-7 share their start, data and steps and differ only in the loss
.PHONY: draft-hass-7e eval-hass-7e
draft-hass-7e: setup
	$(BIN)/python -m hass train --data $(STAGE7_DATA) --out $(RUNS)/smollm2-135m-hass-7e \
		--init $(or $(STAGE7_INIT_EAGLE2),$(DRAFTS)/smollm2-135m-eagle2) --align-steps 3 --topk-weight 1.0 $(STAGE7_FLAGS) --snapshots $(RESUME)

eval-hass-7e: eval-run-hass-7e

draft-eagle2-6-8k: setup
	$(BIN)/python -m hass train --data $(STAGE6_DATA) --out $(RUNS)/smollm2-135m-eagle2-6-8k \
		--init $(DRAFTS)/smollm2-135m-eagle2 --align-steps 1 --topk-weight 0.0 $(STAGE4_FLAGS) $(RESUME)

eval-eagle2-6-8k: eval-run-eagle2-6-8k

# the pass-decay probe: stage 4's HASS run with alignment pass j weighted 0.5 ** (j - 1)
# (--init is the shipped folder: run it with DRAFTS=<the stage-3 drafts>, as the probe was)
.PHONY: prepare-distill-heldout draft-hass-4-decay
draft-hass-4-decay: setup
	$(BIN)/python -m hass train --data $(STAGE4_DATA) --out $(RUNS)/smollm2-135m-hass-4-decay \
		--init $(DRAFTS)/smollm2-135m-hass --align-steps 3 --topk-weight 1.0 --pass-decay 0.5 $(STAGE4_FLAGS) $(RESUME)

# Both drafts of a continuation stage N (3, 4, 5), evaluated the same way (held-out accuracy on
# the distilled held-out dialogues), and shipped with a card (`make ship-drafts-N SHIP=hass`);
# pattern rules, so not .PHONY (make skips pattern rules for phony targets).
STAGE3_DATA = $(DATA)/distill-train-$(MAX_LEN)
STAGE3_COMMAND = make prepare-3 && make drafts-3
STAGE4_COMMAND = make drafts-4
STAGE5_COMMAND = make drafts-5
STAGE6_COMMAND = make drafts-6
STAGE7_COMMAND = make drafts-7
STAGE8_COMMAND = make drafts-7 && make drafts-8
STAGE9_COMMAND = make drafts-7 && make drafts-8 && make drafts-9
# one run folder with the issues' protocol (eval-run-hass-7e evaluates runs/drafts/smollm2-135m-hass-7e)
eval-run-%: setup
	$(BIN)/python -m hass eval-draft --draft $(RUNS)/smollm2-135m-$* --heldout $(DATA)/distill-heldout-$(MAX_LEN) \
		$(TAU_FLAGS) --out $(RUNS)/smollm2-135m-$*/eval.json

eval-drafts-%: setup
	$(MAKE) eval-run-hass-$*; $(MAKE) eval-run-eagle2-$*

ship-drafts-%: setup
	for d in $(SHIP); do \
		$(BIN)/python -m hass card --draft $(RUNS)/smollm2-135m-$$d-$* --out $(DRAFTS)/smollm2-135m-$$d \
			--data $(STAGE$*_DATA) --title "SmolLM2-135M-Instruct $$d draft" \
			--command "$(STAGE$*_COMMAND) && make ship-drafts-$* SHIP=$$d"; \
	done
