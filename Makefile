# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create/refresh .venv; torch is pinned to the local CPU build so nothing pulls a CUDA one.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo demo-latent demo-text test bench bench-peer install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# train the embedded default (class-conditional digits; --overwrite replaces an earlier demo run), sample it,
# score the samples, then the exact-mixture sampler demo
demo: $(STAMP)
	$(PY) -m unifusion train --overwrite
	$(PY) -m unifusion sample --checkpoint runs/digits --sampler dpmpp_2m --nfe 20 --seeds 0-99 \
		--out runs/digits/samples.npz --png runs/digits/samples_grid.png
	$(PY) -m unifusion eval --checkpoint runs/digits
	$(PY) -m unifusion demo --out runs/demo

# the latent path on the procedural shapes (32x32 RGB): a KL autoencoder (f4, 4 channels) and its latent
# statistics, 20,000 training images encoded to shards, class-conditional EDM on the 4x8x8 latents, decoded
# samples, then both scored (reconstruction PSNR/SSIM/rFID; FID and attribute accuracy of the samples)
LATENT_STEPS ?= 2500
demo-latent: $(STAMP)
	$(PY) -m unifusion autoencoder train --out runs/shapes-ae --overwrite
	$(PY) -m unifusion encode --autoencoder runs/shapes-ae --data shapes-32-train:20000 --batch-size 256 \
		--out runs/shapes-latents --overwrite
	$(PY) -m unifusion train --data runs/shapes-latents --network.model_channels 32 --steps $(LATENT_STEPS) \
		--out runs/shapes-ldm --overwrite
	$(PY) -m unifusion sample --checkpoint runs/shapes-ldm --seeds 0-95 --out runs/shapes-ldm/samples.npz \
		--png runs/shapes-ldm/samples_grid.png
	$(PY) -m unifusion eval --checkpoint runs/shapes-ae --n 1000
	$(PY) -m unifusion eval --checkpoint runs/shapes-ldm --n 1000

# text-to-image in miniature on shapes-t2i (32x32 RGB; the held-out attribute combinations never seen in
# training): a CLIP-loss text encoder, a KL autoencoder (f4, 4x8x8 latents) and the captioned latents, a
# text-conditional latent UNet with cross-attention at 8x8 and 4x4 (the best of benchmarks/text2image.py's
# six configurations at 10 CPU-minutes); samples of examples/prompts.txt (seen and held-out combinations, one
# row each) and the GenEval-style scores at CFG 5 (`unifusion eval --checkpoint runs/t2i --cfg-scales 1,3,5` for more)
T2I_DATA ?= shapes-t2i-32-train:20000
T2I_STEPS ?= 1800
demo-text: $(STAMP)
	$(PY) -m unifusion encoder train --data $(T2I_DATA) --steps 500 --width 96 --layers 2 --lr 1e-3 \
		--weight-decay 0.05 --ema-half-life 10000 --out runs/t2i-encoder --overwrite
	$(PY) -m unifusion autoencoder train --data $(T2I_DATA) --steps 800 --out runs/t2i-ae --overwrite
	$(PY) -m unifusion encode --autoencoder runs/t2i-ae --data $(T2I_DATA) --batch-size 256 --out runs/t2i-latents \
		--overwrite
	$(PY) -m unifusion train --data runs/t2i-latents --text-encoder runs/t2i-encoder/model --lr 1e-3 \
		--network.model_channels 32 --network.attn_resolutions '[8,4]' --steps $(T2I_STEPS) --out runs/t2i --overwrite
	$(PY) -m unifusion sample --checkpoint runs/t2i --prompts examples/prompts.txt --n 8 --cfg 5 \
		--out runs/t2i/prompts.npz --png runs/t2i/prompts.png --overwrite
	$(PY) -m unifusion eval --checkpoint runs/t2i --n 300 --geneval 20 --cfg-scales 5

# the layering contract of DESIGN §3 (import-linter, [tool.importlinter] in pyproject.toml), then the tests
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

# peers for the side-by-side benchmark (never runtime dependencies)
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]" $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps k-diffusion==0.1.1.post1
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/samplers.py

# denoising-diffusion-pytorch needs torchvision, which does not import beside the CPU torch 2.13.0
# build; both sides of that benchmark run in their own venv with torch 2.14.1 + torchvision 0.29.1
# (a CUDA build, ~5.5 GB, taken from this machine's disk; it runs on the CPU). About 75 minutes on 2 cores.
PEER := .venv-peer
$(PEER)/.installed: pyproject.toml
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
		denoising-diffusion-pytorch==2.3.4 psutil
	$(PEER)/bin/pip install -q --disable-pip-version-check -e . torch==2.14.1
	touch $@

BUDGET ?= 10
bench-peer: $(PEER)/.installed
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py train --side ours --budget-cpu-min $(BUDGET) --out runs/vs/ours
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py train --side ours --unconditional --budget-cpu-min $(BUDGET) \
		--out runs/vs/ours-uncond
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py train --side peer --budget-cpu-min $(BUDGET) \
		--out runs/vs/peer-readme --n-samples 500
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py train --side peer --peer-config small \
		--budget-cpu-min $(BUDGET) --out runs/vs/peer-small
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py report runs/vs/ours runs/vs/ours-uncond runs/vs/peer-readme runs/vs/peer-small
	$(PEER)/bin/python benchmarks/vs_ddpm_pytorch.py report runs/vs/ours runs/vs/ours-uncond runs/vs/peer-readme runs/vs/peer-small \
		--n 500 --json runs/vs/report-n500.json

clean:
	rm -rf $(VENV) build src/*.egg-info
