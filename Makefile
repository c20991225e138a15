# ddil: `make toy` runs the main job, `make test` the tests. Each sets up .venv on first use.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: toy toy-quick toy-study toy-study-quick test clean-venv help

# $(call timed,COMMAND): show and run COMMAND, then print its wall time (set-up excluded), the number of cores and
# the load average when it started (above ~0 means other work shared the cores), so every time comes with its conditions
timed = @echo '$(1)'; start=$$(date +%s); load=$$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?'); \
	$(1); rc=$$?; \
	echo "make $@: $$(( $$(date +%s) - start )) s wall on $$(getconf _NPROCESSORS_ONLN) cores, load average $$load at the start"; \
	exit $$rc

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/'

.venv/.installed: requirements.txt scripts/install.sh
	sh scripts/install.sh

toy: .venv/.installed  ## 2-D: PD/LCM/DMD2 x {base, +DDIL} (+reflected DMD2); high D (ring8-d32): PD/LCM base vs +DDIL; 3 seeds -> results/toy (under 5 min on 2 quiet cores)
	$(call timed,$(PY) -m toy.suite --seeds 3)

toy-quick: .venv/.installed  ## the same, 1 seed and short training (25-30 s on 2 quiet cores, about 2 min on busy ones) -> results/toy-quick
	$(call timed,$(PY) -m toy.suite --quick --out results/toy-quick)

toy-study: .venv/.installed  ## the toy study: parts 1-7, and part 8's on-policy map with the oracle DAgger arm -> results/toy/STUDY.md + figures (resumes from results/toy/cache)
	$(call timed,$(PY) -m toy.study)

toy-study-quick: .venv/.installed  ## a small subset of the study (a couple of minutes) -> results/toy-study-quick
	$(call timed,$(PY) -m toy.study --quick --out results/toy-study-quick)

test: .venv/.installed  ## all tests (pytest + hypothesis), CPU only, under 5 minutes on 2 cores
	$(call timed,$(PY) -m pytest -q tests)

clean-venv:  ## remove the environment
	rm -rf .venv

# Stable Diffusion (sd/): the same ddil.py through diffusers. One GPU each; SD_MODEL is a Hub id or a local
# pipeline folder (offline: a folder, or HF_HUB_OFFLINE=1 with the model cached); SD_ARGS adds sd.train flags.
SD_MODEL ?= stable-diffusion-v1-5/stable-diffusion-v1-5
SD_ARGS ?=
SD_GPU := --pretrained_teacher_model $(SD_MODEL) --mixed_precision bf16 --gradient_checkpointing
.PHONY: sd-lcm sd-pd sd-dmd2 sd-tiny sd-bench sd-gpu-check

sd-lcm: .venv/.installed  ## SD1.5 LCM + DDIL + reflection, 4-step student, prompts of sd/prompts.txt -> results/sd-lcm (GPU)
	$(PY) -m sd.train --method lcm $(SD_GPU) --output_dir results/sd-lcm $(SD_ARGS)

sd-pd: .venv/.installed  ## SD1.5 progressive distillation 8 -> 4 steps + DDIL -> results/sd-pd (GPU)
	$(PY) -m sd.train --method pd $(SD_GPU) --output_dir results/sd-pd $(SD_ARGS)

sd-dmd2: .venv/.installed  ## SD1.5 DMD2 + DDIL, 4-step generator -> results/sd-dmd2 (GPU)
	$(PY) -m sd.train --method dmd2 $(SD_GPU) --output_dir results/sd-dmd2 $(SD_ARGS)

# the CPU smoke run: a tiny pipeline from config, 30 LCM + DDIL steps, then a sample grid
SD_TINY = $(PY) -m sd.tiny results/sd-tiny/model && \
	$(PY) -m sd.train --method lcm --pretrained_teacher_model results/sd-tiny/model --device cpu --resolution 16 \
	  --train_batch_size 8 --max_train_steps 30 --num_inference_steps 2 --teacher_substeps 4 --checkpointing_steps 10 \
	  --checkpoints_total_limit 2 --output_dir results/sd-tiny/lcm --overwrite_output_dir $(SD_ARGS) && \
	$(PY) -m sd.sample --student results/sd-tiny/lcm/student --steps 2 --device cpu --num_images_per_prompt 2 \
	  --out results/sd-tiny/grid.png

sd-tiny: export OMP_NUM_THREADS = 1  # the tiny nets gain nothing from threads, which spin-wait on busy cores
sd-tiny: .venv/.installed  ## CPU smoke run: a tiny pipeline, 30 LCM + DDIL steps, a sample grid -> results/sd-tiny (under a minute)
	$(call timed,$(SD_TINY))

sd-bench: .venv/.installed  ## GPU: diffusers-style LCM step vs ddil's LCM and LCM + DDIL steps, SD1.5 architecture, B = 16 at 512 px -> results/sd/bench-<device>.json
	$(PY) -m sd.bench --out results/sd $(SD_ARGS)

sd-gpu-check: .venv/.installed  ## GPU: lcm, pd, dmd2 x 20 steps, random-init SD1.5 at 512 px, bf16, with and without gradient checkpointing, a 4-step sample -> results/sd/gpu-check.json
	$(PY) -m sd.gpu_check --out results/sd/gpu-check.json $(SD_ARGS)
