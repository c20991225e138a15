"""sd/: ddil.py's algorithms on Stable Diffusion through diffusers (see sd/README.md).

adapters.py  SD UNets under ddil's denoiser contract      data.py    image, 🤗 datasets and prompts-only sources
train.py     python -m sd.train (lcm, pd, dmd2 + DDIL)      config.py  the run's dataclass config and flags
checkpoint.py atomic checkpoints, RNG states                 sample.py  python -m sd.sample -> PNG grid
eval.py      FID, CLIP score, density/coverage, LPIPS       tiny.py    tiny and random-SD1.5 pipelines from configs
bench.py     python -m sd.bench: ddil's step vs diffusers'   gpu_check.py  python -m sd.gpu_check (make sd-gpu-check)
"""
