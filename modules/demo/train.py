"""Train the demo model from scratch: the VAE first, then the text encoder and UNet on its latents.

Everything is driven by one seed: data items come from `(seed, index)`, the noise of step s from
`(seed, s)`, so a resumed run continues exactly where the saved state left off. A wall-clock
budget (`max_minutes`, counted across resumes) stops training in time to save and export.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from modules.demo import shapes
from modules.demo.nets import DemoArch, DemoNets, build_nets
from modules.sampling.schedules import DiscreteSchedule, scaled_linear_alphas_cumprod

SCALE = 0.18215  # SD 1.x latent scaling factor; the VAE is reparameterised to match it
GRID_PROMPTS = ("a red circle on a blue background, top left", "a green square on a white background, centre",
                "a yellow triangle on a black background, bottom right", "a white circle on a purple background, right",
                "a blue square on an orange background, top", "a black triangle on a yellow background, left",
                "a purple circle on a green background, bottom left", "an orange square on a red background, bottom")


@dataclass(frozen=True)
class TrainConfig:
    """Training options; the defaults fit 90 minutes on two CPU cores."""

    out: Path
    work_dir: Path
    seed: int = 1234
    device: str = "auto"
    max_minutes: float = 85.0
    vae_share: float = 0.2  # of max_minutes
    vae_steps: int = 4000
    steps: int = 200_000
    vae_batch: int = 16
    batch: int = 32
    pool_size: int = 4096  # training items encoded once after the VAE stage
    vae_lr: float = 5e-4
    lr: float = 4e-4
    uncond_rate: float = 0.1  # empty caption, for classifier-free guidance
    attribute_drop: float = 0.1  # a caption leaves out colour / background / position
    ema: float = 0.999
    sample_every: int = 1000
    save_every: int = 2000
    arch: DemoArch = field(default_factory=DemoArch)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TokenCache:
    """Caption -> the 77 token ids the engine's chunker gives it (captions repeat, so cache them)."""

    def __init__(self) -> None:
        from modules.text.tokenizer import load_tokenizer, special_tokens

        self.tokenizer = load_tokenizer()
        self.ids = special_tokens(self.tokenizer)
        self._cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str], device: torch.device) -> torch.Tensor:
        from modules.text.chunking import chunk_prompt
        from modules.text.prompt_parser import parse_prompt_attention
        from modules.text.tokenizer import tokenize_many

        for text in texts:
            if text not in self._cache:
                fragments = parse_prompt_attention(text)
                chunked = chunk_prompt(fragments, tokenize_many(self.tokenizer, [f[0] for f in fragments]), self.ids)
                self._cache[text] = chunked.chunks[0].tokens
        return torch.tensor([self._cache[t] for t in texts], dtype=torch.long, device=device)


class LatentPool:
    """Training items encoded once by the finished VAE and kept on the device.

    Each item keeps its latent mean and std (a fresh latent is drawn every time it is used) and
    its caption's token ids, so a diffusion step touches no Python per item and runs no encoder.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, tokens: torch.Tensor, empty: torch.Tensor) -> None:
        self.mean, self.std, self.tokens, self.empty = mean, std, tokens, empty

    def __len__(self) -> int:
        return len(self.mean)

    @classmethod
    @torch.no_grad()
    def build(cls, trainer: Trainer, size: int, chunk: int = 1024) -> LatentPool:
        means, stds, tokens = [], [], []
        for start in range(0, size, chunk):
            images, captions = trainer.batch(0, start, min(chunk, size - start))
            with trainer.autocast():
                dist = trainer.nets.vae.encode(images).latent_dist
            means.append(dist.mean.to(torch.bfloat16))
            stds.append(dist.std.to(torch.bfloat16))
            tokens.append(trainer.tokens(captions, trainer.device))
        empty = trainer.tokens([""], trainer.device)
        return cls(torch.cat(means), torch.cat(stds), torch.cat(tokens), empty)

    def draw(self, count: int, uncond_rate: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` items at random: scaled latents [N, 4, h, w] and token ids, some captions emptied."""
        device = self.mean.device
        index = torch.randint(0, len(self), (count,), generator=gen, device=device)
        mean, std = self.mean[index].float(), self.std[index].float()
        latents = (mean + std * torch.randn(mean.shape, generator=gen, device=device)) * SCALE
        drop = torch.rand(count, generator=gen, device=device) < uncond_rate
        return latents, torch.where(drop[:, None], self.empty, self.tokens[index])


@dataclass
class TrainState:
    """What a resume needs besides the networks."""

    stage: str = "vae"  # vae -> diffusion -> done
    vae_step: int = 0
    step: int = 0
    elapsed: float = 0.0  # seconds trained, across resumes
    vae_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Owns the networks, optimisers and EMA copies of one training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.nets = build_nets(cfg.arch, cfg.seed)
        for m in self.nets.modules().values():
            m.to(self.device)
        self.ema = {"unet": copy.deepcopy(self.nets.unet), "text_encoder": copy.deepcopy(self.nets.text_encoder)}
        fused = self.device.type == "cuda"
        self.vae_opt = torch.optim.AdamW(self.nets.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=fused)
        params = [*self.nets.unet.parameters(), *self.nets.text_encoder.parameters()]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=fused)
        self.state = TrainState()
        self.tokens = TokenCache()
        ac = scaled_linear_alphas_cumprod().to(self.device)
        self.alphas_cumprod = ac
        self.schedule = DiscreteSchedule(ac.cpu())
        self.pool: LatentPool | None = None
        self._started = time.monotonic()
        self._elapsed_at_start = 0.0
        self.log_path = cfg.work_dir / "train.log"

    # -- bookkeeping --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self._elapsed_at_start + time.monotonic() - self._started

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def log(self, **entry) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"elapsed": round(self.elapsed(), 1), **entry}) + "\n")

    def save(self) -> Path:
        self.state.elapsed = self.elapsed()
        path = self.cfg.work_dir / "state.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"config": json.dumps(asdict(self.cfg), default=str), "state": asdict(self.state),
                "nets": {k: m.state_dict() for k, m in self.nets.modules().items()},
                "ema": {k: m.state_dict() for k, m in self.ema.items()},
                "vae_opt": self.vae_opt.state_dict(), "opt": self.opt.state_dict()}
        torch.save(blob, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return path

    def resume(self) -> bool:
        path = self.cfg.work_dir / "state.pt"
        if not path.exists():
            return False
        blob = torch.load(path, map_location=self.device, weights_only=True)
        for k, m in self.nets.modules().items():
            m.load_state_dict(blob["nets"][k])
        for k, m in self.ema.items():
            m.load_state_dict(blob["ema"][k])
        self.vae_opt.load_state_dict(blob["vae_opt"])
        self.opt.load_state_dict(blob["opt"])
        self.state = TrainState(**blob["state"])
        self._elapsed_at_start, self._started = self.state.elapsed, time.monotonic()
        return True

    # -- data ---------------------------------------------------------------------------------
    def batch(self, stream: int, index: int, count: int) -> tuple[torch.Tensor, list[str]]:
        images, captions, _ = shapes.sample_batch(self.cfg.seed * 7 + stream, index, count, self.cfg.arch.image_size,
                                                  self.device, self.cfg.attribute_drop)
        return images, captions

    def generator(self, step: int, stream: int) -> torch.Generator:
        gen = torch.Generator(self.device)
        gen.manual_seed((self.cfg.seed * 1_000_003 + step) * 4 + stream)
        return gen

    # -- VAE ----------------------------------------------------------------------------------
    def vae_step(self) -> float:
        cfg, vae = self.cfg, self.nets.vae
        images, _ = self.batch(1, self.state.vae_step * cfg.vae_batch, cfg.vae_batch)
        with self.autocast():
            dist = vae.encode(images).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.generator(self.state.vae_step, 1),
                                                   device=self.device)
            recon = vae.decode(z).sample.float()
        kl = 0.5 * (dist.mean.float() ** 2 + dist.var.float() - 1 - dist.logvar.float()).mean()
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-4 * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        self.state.vae_step += 1
        return loss.item()

    @torch.no_grad()
    def normalise_latents(self, count: int = 512) -> dict[str, float]:
        """Reparameterise quant_conv / post_quant_conv so SCALE * latent has mean 0 and std 1 (exact)."""
        vae = self.nets.vae
        images, _ = self.batch(2, 0, count)
        means = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, count, 64)])
        mu = means.mean(dim=(0, 2, 3))
        k = (1.0 / SCALE) / float((means - mu[None, :, None, None]).std())
        q, p = vae.quant_conv, vae.post_quant_conv
        z = mu.numel()
        p.bias += p.weight[:, :, 0, 0] @ mu
        p.weight /= k
        q.weight[:z] *= k
        q.bias[:z] = (q.bias[:z] - mu) * k
        q.bias[z:] += 2 * math.log(k)
        return {"latent_scale": k, "latent_shift": [round(float(v), 4) for v in mu]}

    # -- diffusion ----------------------------------------------------------------------------
    def diffusion_step(self) -> torch.Tensor:
        """One optimiser step on draws from the pool; returns the loss without waiting for the device."""
        cfg, step = self.cfg, self.state.step
        gen = self.generator(step, 0)
        latents, ids = self.pool.draw(cfg.batch, cfg.uncond_rate, gen)
        t = torch.randint(0, len(self.alphas_cumprod), (cfg.batch,), generator=gen, device=self.device)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        a = self.alphas_cumprod[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with self.autocast():
            context = self.nets.text_encoder(input_ids=ids).last_hidden_state
            eps = self.nets.unet(noisy, t, encoder_hidden_states=context).sample.float()
        snr = a.flatten() / (1 - a.flatten())
        weight = snr.clamp(max=5.0) / snr  # min-SNR-5 weighting for the eps objective
        loss = (weight * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        warm = min(1.0, (step + 1) / 500)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * warm
        self.opt.step()
        self.update_ema()
        self.state.step += 1
        return loss.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema, (1 + self.state.step) / (10 + self.state.step))
        for name, ema in self.ema.items():
            live = self.nets.modules()[name]
            ema_params = list(ema.parameters())
            torch._foreach_lerp_(ema_params, list(live.parameters()), 1 - decay)

    def ema_nets(self) -> DemoNets:
        return DemoNets(self.ema["unet"], self.nets.vae, self.ema["text_encoder"])

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 20, cfg_scale: float = 7.0, seed: int = 0) -> torch.Tensor:
        """Euler sampling with CFG on the EMA networks: images [N, 3, S, S] in [-1, 1]."""
        nets = self.ema_nets()
        n, side = len(prompts), self.cfg.arch.image_size // 8
        gen = torch.Generator(self.device).manual_seed(seed)
        sigmas = self.schedule.get_sigmas(steps).to(self.device)
        x = torch.randn((n, 4, side, side), generator=gen, device=self.device) * sigmas[0]
        with self.autocast():
            ctx = nets.text_encoder(input_ids=self.tokens(list(prompts) + [""] * n, self.device)).last_hidden_state
        for i in range(steps):
            sigma = sigmas[i]
            t = self.schedule.sigma_to_t(sigma).expand(2 * n)
            inp = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
            with self.autocast():
                eps = nets.unet(inp, t, encoder_hidden_states=ctx).sample.float()
            cond, uncond = eps.chunk(2)
            denoised = x - sigma * (uncond + cfg_scale * (cond - uncond))
            x = denoised + (x - denoised) / sigma * sigmas[i + 1]
        with self.autocast():
            return nets.vae.decode(x / SCALE).sample.float().clamp(-1, 1)

    def save_grid(self, name: str) -> Path | None:
        try:
            from PIL import Image

            from modules.pipeline.latents import to_pil
        except ImportError:  # a bare training machine without Pillow: no grids
            return None

        images = to_pil(self.sample(list(GRID_PROMPTS)).cpu())
        side = self.cfg.arch.image_size
        grid = Image.new("RGB", (side * 4, side * ((len(images) + 3) // 4)))
        for i, im in enumerate(images):
            grid.paste(im, ((i % 4) * side, (i // 4) * side))
        path = self.cfg.work_dir / "samples" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


def _train_vae(tr: Trainer, budget: float) -> None:
    cfg, st = tr.cfg, tr.state
    bar = _progress(cfg.vae_steps, st.vae_step, "VAE")
    while st.vae_step < cfg.vae_steps and tr.elapsed() < budget * cfg.vae_share:
        loss = tr.vae_step()
        bar.update(1)
        if st.vae_step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
            tr.log(stage="vae", step=st.vae_step, loss=round(loss, 5))
        if st.vae_step % cfg.save_every == 0:
            tr.save()
    bar.close()
    tr.log(stage="vae-done", step=st.vae_step, **tr.normalise_latents())
    st.stage, st.vae_seconds = "diffusion", tr.elapsed()
    tr.save()


def _train_diffusion(tr: Trainer, budget: float, reserve: float) -> None:
    cfg, st = tr.cfg, tr.state
    if st.step < cfg.steps:
        began = tr.elapsed()
        tr.pool = LatentPool.build(tr, cfg.pool_size)
        tr.log(event="pool", items=len(tr.pool), seconds=round(tr.elapsed() - began, 1))
    bar = _progress(cfg.steps, st.step, "UNet+CLIP")
    recent: list[torch.Tensor] = []
    while st.step < cfg.steps and tr.elapsed() < budget - reserve:
        recent.append(tr.diffusion_step())
        bar.update(1)
        if st.step % 50 == 0:
            mean = float(torch.stack(recent).mean())
            recent.clear()
            st.losses.append(round(mean, 5))
            bar.set_postfix(loss=f"{mean:.4f}")
            tr.log(stage="diffusion", step=st.step, loss=round(mean, 5))
        if st.step % cfg.sample_every == 0:
            tr.save_grid(f"step-{st.step:06d}")
        if st.step % cfg.save_every == 0:
            tr.save()
    bar.close()


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train (or resume) within `cfg.max_minutes` and write the checkpoint to `cfg.out`."""
    from modules.demo.export import export_checkpoint

    tr = Trainer(cfg)
    if resume and tr.resume():
        tr.log(event="resumed", stage=tr.state.stage, step=tr.state.step, vae_step=tr.state.vae_step)
    budget = cfg.max_minutes * 60
    reserve = max(20.0, 0.02 * budget)
    if tr.state.stage == "vae":
        _train_vae(tr, budget)
    if tr.state.stage == "diffusion":
        _train_diffusion(tr, budget, reserve)
    tr.save()
    grid = tr.save_grid("final")
    extra = {"seed": cfg.seed, "vae_steps": tr.state.vae_step, "steps": tr.state.step,
             "batch": cfg.batch, "device": str(tr.device), "train_seconds": round(tr.elapsed()),
             "dataset": "modules/demo/shapes.py"}
    path = export_checkpoint(tr.ema_nets(), cfg.arch, cfg.out, extra)
    tr.log(event="exported", path=str(path), grid=str(grid), **extra)
    return path
