"""The weight-based line and soft-edge preprocessors (HED, PiDiNet, lineart) on tiny random weights.

Each file is written here from a small reference module that follows the published architecture
(original key names, narrow widths), independent of the loader; the preprocessor's map must match
that module's forward plus the published post-processing. PiDiNet's reference computes the pixel
differences directly (unfolded neighbourhoods), so the loader's kernel conversion is checked too.
"""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from extensions.controlnet import preprocessors
from extensions.controlnet.annotators import Annotators
from modules.plugins import api
from tests.api_server import start_server


# ---------------------------------------------------------------- reference modules (published layouts)
class RefHEDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2)
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x, self.projection(x)


class RefHED(nn.Module):
    """ControlNetHED_Apache2 with narrow widths."""

    def __init__(self, widths=(4, 6, 8, 8, 8), layers=(2, 2, 3, 3, 3)) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.rand(1, 3, 1, 1) * 255)
        cins = (3, *widths[:-1])
        for n, (cin, cout, k) in enumerate(zip(cins, widths, layers, strict=True), 1):
            setattr(self, f"block{n}", RefHEDBlock(cin, cout, k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = x - self.norm, []
        for n in range(1, 6):
            h, projection = getattr(self, f"block{n}")(h, n > 1)
            out.append(projection)
        return out


NEXT_CLOCKWISE = [1, 2, 5, 0, 4, 8, 3, 6, 7]  # 3x3 tap -> its clockwise neighbour
RD_OUTER, RD_INNER = [0, 2, 4, 10, 14, 20, 22, 24], [6, 7, 8, 11, 13, 16, 17, 18]


def pixel_difference_conv(x: torch.Tensor, w: torch.Tensor, kind: str, depthwise: bool) -> torch.Tensor:
    """A pixel-difference convolution computed from differences of unfolded neighbourhoods."""
    n, c, h, width = x.shape
    if kind == "rd":
        p = F.unfold(x, 5, padding=2).view(n, c, 25, -1)
        diff, taps = p[:, :, RD_OUTER] - p[:, :, RD_INNER], w.flatten(2)[..., 1:]
    else:
        p = F.unfold(x, 3, padding=1).view(n, c, 9, -1)
        diff = {"cv": p, "cd": p - p[:, :, 4:5], "ad": p - p[:, :, NEXT_CLOCKWISE]}[kind]
        taps = w.flatten(2)
    y = torch.einsum("ck,nckl->ncl", taps[:, 0], diff) if depthwise else torch.einsum("ock,nckl->nol", taps, diff)
    return y.view(n, -1, h, width)


class RefPDC(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, depthwise: bool) -> None:
        super().__init__()
        self.kind, self.depthwise = kind, depthwise
        self.weight = nn.Parameter(torch.randn(cout, 1 if depthwise else cin, 3, 3) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_difference_conv(x, self.weight, self.kind, self.depthwise)


class RefPDCBlock(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        self.conv1 = RefPDC(kind, cin, cin, depthwise=True)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 2)
        y = self.conv2(torch.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class RefCDCM(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1)
        for k, d in enumerate((5, 7, 9, 11), 1):
            setattr(self, f"conv2_{k}", nn.Conv2d(cout, cout, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(torch.relu(x))
        return sum(getattr(self, f"conv2_{k}")(x) for k in range(1, 5))


class RefCSAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(torch.relu(x))))


class RefMapReduce(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RefPiDiNet(nn.Module):
    """PiDiNet, "carv4" with dilation and attention (table 5), narrow."""

    def __init__(self, c: int = 4, dil: int = 4) -> None:
        super().__init__()
        kinds = ["cd", "ad", "rd", "cv"] * 4
        self.init_block = RefPDC(kinds[0], 3, c, depthwise=False)
        widths, layer = (c, 2 * c, 4 * c, 4 * c), 1
        self.stages = []
        for s, (blocks, cout) in enumerate(zip((3, 4, 4, 4), widths, strict=True), 1):
            cin = widths[max(s - 2, 0)]
            names = []
            for k in range(1, blocks + 1):
                stride = 2 if s > 1 and k == 1 else 1
                setattr(self, f"block{s}_{k}", RefPDCBlock(kinds[layer], cin if k == 1 else cout, cout, stride))
                names.append(f"block{s}_{k}")
                layer += 1
            self.stages.append(names)
        self.dilations = nn.ModuleList(RefCDCM(w, dil) for w in widths)
        self.attentions = nn.ModuleList(RefCSAM(dil) for _ in widths)
        self.conv_reduces = nn.ModuleList(RefMapReduce(dil) for _ in widths)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, h, sides = x.shape[2:], self.init_block(x), []
        for i, names in enumerate(self.stages):
            for name in names:
                h = getattr(self, name)(h)
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))
            sides.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(sides, 1)))


class RefResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                        nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class RefLineGenerator(nn.Module):
    """The line-drawing Generator (3 -> 1 channels, sigmoid), narrow."""

    def __init__(self, c: int = 4, residuals: int = 2) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(),
                                    nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.InstanceNorm2d(4 * c), nn.ReLU())
        self.model2 = nn.Sequential(*[RefResidual(4 * c) for _ in range(residuals)])
        self.model3 = nn.Sequential(nn.ConvTranspose2d(4 * c, 2 * c, 3, 2, 1, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(),
                                    nn.ConvTranspose2d(2 * c, c, 3, 2, 1, 1), nn.InstanceNorm2d(c), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class RefUNetBlock(nn.Module):
    """pix2pix's U-Net skip block with parameter-free instance norms (biased convs)."""

    def __init__(self, outer: int, inner: int, input_nc: int | None = None, sub: nn.Module | None = None,
                 outermost: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(input_nc or outer, inner, 4, 2, 1)
        if outermost:
            layers = [down, sub, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif sub is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, 2, 1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class RefUNet(nn.Module):
    """UnetGenerator(3, 1, num_downs=8, ngf) as lineart_anime builds it, narrow."""

    def __init__(self, ngf: int = 2, num_downs: int = 8) -> None:
        super().__init__()
        block = RefUNetBlock(ngf * 8, ngf * 8)
        for _ in range(num_downs - 5):
            block = RefUNetBlock(ngf * 8, ngf * 8, sub=block)
        for outer, inner in ((ngf * 4, ngf * 8), (ngf * 2, ngf * 4), (ngf, ngf * 2)):
            block = RefUNetBlock(outer, inner, sub=block)
        self.model = RefUNetBlock(1, ngf, input_nc=3, sub=block, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ---------------------------------------------------------------- published pre- and post-processing
def padded(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.pad(rgb, [[0, (64 - h % 64) % 64], [0, (64 - w % 64) % 64], [0, 0]], mode="edge")


def safe_step(x: np.ndarray) -> np.ndarray:
    return np.floor(x.astype(np.float32) * 3) / 2


def as_uint8(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return (x[:h, :w] * 255.0).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def hed_reference(model: RefHED, rgb: np.ndarray, safe: bool) -> np.ndarray:
    big = padded(rgb)
    x = torch.from_numpy(big).float().permute(2, 0, 1)[None]
    maps = [F.interpolate(p, size=big.shape[:2], mode="bilinear", align_corners=False)[0, 0] for p in model(x)]
    edge = 1 / (1 + np.exp(-torch.stack(maps).mean(0).double().numpy()))
    return as_uint8(safe_step(edge) if safe else edge, *rgb.shape[:2])


@torch.no_grad()
def pidinet_reference(model: RefPiDiNet, rgb: np.ndarray, safe: bool) -> np.ndarray:
    bgr = padded(rgb)[..., ::-1].copy()
    edge = model(torch.from_numpy(bgr).float().permute(2, 0, 1)[None] / 255.0)[0, 0].numpy()
    return as_uint8(safe_step(edge) if safe else edge, *rgb.shape[:2])


@torch.no_grad()
def lineart_reference(model: RefLineGenerator, rgb: np.ndarray) -> np.ndarray:
    line = model(torch.from_numpy(padded(rgb)).float().permute(2, 0, 1)[None] / 255.0)[0, 0].numpy()
    return 255 - as_uint8(line, *rgb.shape[:2])


@torch.no_grad()
def anime_reference(model: RefUNet, rgb: np.ndarray) -> np.ndarray:
    big = padded(rgb)
    h, w = big.shape[:2]
    size = (256 * int(np.ceil(h / 256)), 256 * int(np.ceil(w / 256)))
    x = torch.from_numpy(big).float().permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).round().clamp(0, 255)  # cv2 cubic, uint8
    line = model(x / 127.5 - 1.0)[:, :1] * 127.5 + 127.5
    line = F.interpolate(line, size=(h, w), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (255 - line.clip(0, 255).astype(np.uint8))[: rgb.shape[0], : rgb.shape[1]]


# ---------------------------------------------------------------- helpers
def scene(h: int = 64, w: int = 64) -> np.ndarray:
    """A picture with edges and gradients."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], axis=2).astype(np.uint8)
    img[10:30, 20:50] = (250, 30, 60)
    img[(x - w * 3 // 4) ** 2 + (y - h // 2) ** 2 < 90] = (20, 200, 40)
    return img


def make(model: nn.Module, path, wrap: bool = False, seed: int = 0):
    """Save `model`'s state dict as the release does (PiDiNet: {"state_dict": {"module." + key}})."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrap else sd, path)
    return path


def seeded(cls, seed: int, gain: float | None = None, **kwargs) -> nn.Module:
    """A reference model with random weights; `gain` spreads the conv kernels (He-like) so that a
    narrow random net still gives a map with contrast rather than a flat one."""
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if gain is not None and p.ndim == 4:
                p.normal_(0, gain / p[0].numel() ** 0.5)
    return model


def hed_model(seed: int = 0) -> RefHED:
    model = seeded(RefHED, seed, gain=1.5)
    with torch.no_grad():
        model.block1.convs[0].weight.mul_(1 / 100)  # inputs are 0..255
    return model


def run(name: str, folder, rgb: np.ndarray) -> np.ndarray:
    """Preprocessor `name` at the image's own size, from a folder path or a shared `Annotators`."""
    pre = preprocessors.find(name)
    annotators = folder if isinstance(folder, Annotators) else Annotators(folder)
    return preprocessors.run(pre, Image.fromarray(rgb), None, min(rgb.shape[:2]), -1, -1, 0, annotators)


def close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to one level where float rounding crosses a uint8 step; three channels, and not flat."""
    assert ours.shape == (*ref.shape, 3) and ours.dtype == np.uint8
    assert (ours == ours[..., :1]).all()
    diff = np.abs(ours[..., 0].astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert ref.std() > 5, "the reference map is flat: the test would prove nothing"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(("file", "dtype"), [("ControlNetHED.pth", torch.float16),  # a half-precision file
                                             ("ControlNetHED_Apache2.pth", torch.float32)])
def test_softedge_hed_matches_the_reference_and_safe_quantises(tmp_path, file, dtype):
    model, rgb = hed_model(), scene(64, 96)  # padded to 64x128 and cropped back
    make(model.to(dtype), tmp_path / file)
    model.float()
    folder = Annotators(tmp_path)  # one folder: the safe variant must not reuse the plain runner
    close(run("softedge_hed", folder, rgb), hed_reference(model, rgb, safe=False))
    safe = run("softedge_hedsafe", folder, rgb)
    close(safe, hed_reference(model, rgb, safe=True))
    assert set(np.unique(safe)) <= {0, 127, 255} and len(np.unique(safe)) > 1
    assert preprocessors.find("hed_safe").name == preprocessors.find("softedge_hed_safe").name == "softedge_hedsafe"


def test_softedge_pidinet_matches_the_pixel_difference_reference(tmp_path):
    model, rgb = seeded(RefPiDiNet, 1, gain=1.2), scene()
    make(model, tmp_path / "table5_pidinet.pth", wrap=True)
    folder = Annotators(tmp_path)
    close(run("softedge_pidinet", folder, rgb), pidinet_reference(model, rgb, safe=False))
    safe = run("softedge_pidisafe", folder, rgb)
    close(safe, pidinet_reference(model, rgb, safe=True))
    assert set(np.unique(safe)) <= {0, 127, 255} and len(np.unique(safe)) > 1


def test_lineart_realistic_and_coarse_match_the_generator(tmp_path):
    fine, coarse, rgb = seeded(RefLineGenerator, 2), seeded(RefLineGenerator, 3, residuals=3), scene()
    make(fine, tmp_path / "sk_model.pth")
    make(coarse, tmp_path / "sk_model2.pth")
    realistic = run("lineart_realistic", tmp_path, rgb)
    close(realistic, lineart_reference(fine, rgb))
    close(run("lineart_coarse", tmp_path, rgb), lineart_reference(coarse, rgb))
    assert preprocessors.find("lineart").name == "lineart_realistic"


def test_lineart_anime_matches_the_unet(tmp_path):
    model, rgb = seeded(RefUNet, 4, gain=1.5), scene()
    make(model, tmp_path / "netG.pth")
    close(run("lineart_anime", tmp_path, rgb), anime_reference(model, rgb))


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_bad_files_name_the_file_and_keep_the_last_good_runner(tmp_path):
    rgb, folder = scene(), Annotators(tmp_path)  # one folder throughout: the HED runner stays loaded
    with pytest.raises(api.InvalidParams, match=r"sk_model2\.pth"):
        run("lineart_coarse", folder, rgb)
    with pytest.raises(api.InvalidParams, match=r"ControlNetHED\.pth or ControlNetHED_Apache2\.pth"):
        run("softedge_hed", folder, rgb)
    make(hed_model(), tmp_path / "ControlNetHED.pth")
    good = run("softedge_hed", folder, rgb)
    make(hed_model(), tmp_path / "table5_pidinet.pth")  # HED weights under PiDiNet's name
    with pytest.raises(api.InvalidParams, match=r"table5_pidinet\.pth.*softedge_pidinet"):
        run("softedge_pidinet", folder, rgb)
    broken = seeded(RefLineGenerator, 5).state_dict()
    broken["model1.3.weight"] = broken["model1.3.weight"][:, :3]  # right keys, a width that does not chain
    torch.save(broken, tmp_path / "sk_model2.pth")
    with pytest.raises(api.InvalidParams, match=r"sk_model2\.pth does not fit preprocessor 'lineart_coarse'"):
        run("lineart_coarse", folder, rgb)
    whole = (tmp_path / "ControlNetHED.pth").read_bytes()
    (tmp_path / "sk_model.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(api.InvalidParams, match=r"sk_model\.pth could not be read"):
        run("lineart_realistic", folder, rgb)
    marker = tmp_path / "pwned"
    torch.save({"model0.1.weight": torch.zeros(1), "payload": RunsCode(marker)}, tmp_path / "sk_model2.pth")
    with pytest.raises(api.InvalidParams, match=r"sk_model2\.pth could not be read"):
        run("lineart_coarse", folder, rgb)
    assert not marker.exists()
    assert np.array_equal(run("softedge_hed", folder, rgb), good)


def test_detect_over_http_runs_softedge_hed(tmp_path):
    server = start_server(tmp_path)
    try:
        model, rgb = hed_model(), scene()
        folder = server.context.app.settings.models_dir / "annotators"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        body = {"controlnet_module": "softedge_hed", "controlnet_processor_res": 64,
                "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()]}
        with httpx.Client(base_url=server.url, timeout=120) as http:
            missing = http.post("/controlnet/detect", json=body)
            assert missing.status_code == 422 and "ControlNetHED.pth" in missing.json()["detail"]
            make(model, folder / "ControlNetHED.pth")
            response = http.post("/controlnet/detect", json=body)
        assert response.status_code == 200, response.text
        detected = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
        close(detected, hed_reference(model, rgb, safe=False))
    finally:
        server.stop()
