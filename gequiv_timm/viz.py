"""A PNG of spatial-transformer inputs beside their rectified outputs, with the sampling grid.

Each row is one test image: the input with the transformer's sampling grid drawn on it (where a coarse lattice of
output pixels reads the input; the red outline is the border of the output), then the rectified output(s) handed to
the backbone (``K`` columns for a ``K``-transformer model).

Examples::

    gequiv-timm stn-viz --model gequiv_stn_cnn_mnist --checkpoint stn.safetensors --out stn.png
    gequiv-timm stn-viz --fit-epochs 3 --out stn.png      # a quick fit on RTS distorted MNIST first (CPU, minutes)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .outputs import atomic_path, check_output_file
from .training.loop import fit

__all__ = ['render_stn', 'plot_stn', 'StnVizError']


def _images(model, protocol: str, seed: int, split: str):
    """Distorted MNIST images shaped for ``model`` (resized / channel-repeated when needed), normalised with the
    model's mean/std, plus labels."""
    from .data.distorted import distorted_mnist
    cfg = model.pretrained_cfg
    c, h, w = cfg['input_size']
    ds = distorted_mnist(protocol, seed=seed)
    part = ds.train if split == 'train' else ds.test
    x = part.images
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False, antialias=True)
    x = x.expand(-1, c, -1, -1)
    mean = torch.tensor(cfg.get('mean', (0.0,) * c)).view(1, -1, 1, 1)[:, :c]
    std = torch.tensor(cfg.get('std', (1.0,) * c)).view(1, -1, 1, 1)[:, :c]
    return (x - mean) / std, part.labels, mean, std


def _fit(model, x, y, epochs: int, seed: int, log=print) -> None:
    """Train on ``(x, y)`` with the package's one loop (:func:`gequiv_timm.training.fit`: AdamW, per-step cosine)."""
    fit(model, torch.utils.data.TensorDataset(x, y), epochs=epochs, batch_size=64, lr=3e-3, weight_decay=1e-4,
        seed=seed, log=lambda rec: log(f"fit epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f}"))


def _to_pixels(g: torch.Tensor, h: int, w: int, align_corners: bool):
    """Normalised ``(x, y)`` -> pixel coordinates (column, row) as ``grid_sample`` reads them."""
    if align_corners:
        return (g[..., 0] + 1) / 2 * (w - 1), (g[..., 1] + 1) / 2 * (h - 1)
    return ((g[..., 0] + 1) * w - 1) / 2, ((g[..., 1] + 1) * h - 1) / 2


def plot_stn(model, x: torch.Tensor, out: str, mean=None, std=None, grid: int = 7, titles=None) -> Path:
    """Write the PNG for inputs ``x [N, C, H, W]`` (normalised as the model expects); returns its path."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    stn = model.stn
    model.eval()
    with torch.no_grad():
        views = model.rectify(x)
        theta = stn._theta.detach()  # [N*K, ...]
        lattice = stn.family.grid(theta, (grid, grid), stn.align_corners)  # [N*K, g, g, 2]
        edge = stn.family.grid(theta, (64, 64), stn.align_corners)
    k = stn.num_transforms
    if k == 1:
        views = views[:, None]
    n, c, h, w = x.shape

    def show(img):
        img = img.float()
        if mean is not None:
            img = img * std + mean
        img = img.permute(1, 2, 0).clamp(0, 1).numpy()
        return img[..., 0] if img.shape[-1] == 1 else img

    fig, axes = plt.subplots(n, 1 + k, figsize=(1.8 * (1 + k), 1.8 * n), squeeze=False)
    colors = ['tab:red', 'tab:cyan', 'tab:orange', 'tab:green']
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(show(x[i]), cmap='gray', vmin=0, vmax=1)
        lo_x, hi_x, lo_y, hi_y = -0.5, w - 0.5, -0.5, h - 0.5
        for j in range(k):
            gx, gy = _to_pixels(lattice[i * k + j], h, w, stn.align_corners)
            for r in range(grid):
                ax.plot(gx[r].numpy(), gy[r].numpy(), color=colors[j % 4], lw=0.5, alpha=0.7)
                ax.plot(gx[:, r].numpy(), gy[:, r].numpy(), color=colors[j % 4], lw=0.5, alpha=0.7)
            ex, ey = _to_pixels(edge[i * k + j], h, w, stn.align_corners)
            bx = torch.cat((ex[0], ex[:, -1], ex[-1].flip(0), ex[:, 0].flip(0)))
            by = torch.cat((ey[0], ey[:, -1], ey[-1].flip(0), ey[:, 0].flip(0)))
            ax.plot(bx.numpy(), by.numpy(), color=colors[j % 4], lw=1.2)
            # show the whole sampled region, also where it leaves the input (padding is read there)
            lo_x, hi_x = min(lo_x, bx.min().item() - 0.5), max(hi_x, bx.max().item() + 0.5)
            lo_y, hi_y = min(lo_y, by.min().item() - 0.5), max(hi_y, by.max().item() + 0.5)
        ax.set_xlim(max(lo_x, -w), min(hi_x, 2 * w))
        ax.set_ylim(min(hi_y, 2 * h), max(lo_y, -h))
        ax.axis('off')
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
        for j in range(k):
            axes[i, 1 + j].imshow(show(views[i, j]), cmap='gray', vmin=0, vmax=1)
            axes[i, 1 + j].axis('off')
    axes[0, 0].set_title(('input + grid' if titles is None else titles[0]), fontsize=7)
    for j in range(k):
        axes[0, 1 + j].set_title(f'rectified{"" if k == 1 else f" {j + 1}"}', fontsize=7)
    fig.suptitle(f"{stn.family.name} spatial transformer", fontsize=8)
    fig.tight_layout()
    path = Path(out)
    try:
        with atomic_path(path, 'out') as tmp:  # a full disk leaves no half-written PNG
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip('.').lower() or 'png')
    finally:
        plt.close(fig)
    return path


class StnVizError(ValueError):
    """The model cannot be created or has no spatial transformer to draw."""


def render_stn(model_name: str, out, checkpoint=None, protocol: str = 'RTS', num: int = 8, grid: int = 7,
               fit_epochs: int = 0, seed: int = 0, log=print) -> Path:
    """Create ``model_name`` (loading ``checkpoint``, or first fitting it ``fit_epochs`` epochs on ``protocol``),
    then draw ``num`` test images of distorted MNIST ``protocol`` with their rectified views into the PNG ``out``.

    Raises :class:`StnVizError` (before any work) when the model cannot be created or has no spatial transformer,
    or ``num`` is not a count of available test images; :class:`~gequiv_timm.outputs.OutputError` when ``out``
    cannot be written (checked first). The PNG is written atomically.
    """
    import timm

    if num < 1:
        raise StnVizError(f"num (--num) must be at least 1 image, got {num}")
    check_output_file(out, 'out (--out)', suffix='.png')
    torch.manual_seed(seed)
    try:
        model = timm.create_model(model_name, pretrained=False)
    except RuntimeError as e:
        raise StnVizError(f"cannot create {model_name!r}: {e}") from None
    if not hasattr(model, 'stn') or not hasattr(model, 'rectify'):
        raise StnVizError(f"{model_name!r} has no spatial transformer; use one of {timm.list_models('gequiv_stn*')}")
    if checkpoint:
        from .weights import load_weights
        load_weights(model, checkpoint, architecture=model_name)
    x, y, mean, std = _images(model, protocol, seed, 'test')  # seeded on their own: before or after fitting alike
    if num > len(x):
        raise StnVizError(f"num (--num) is {num}, but protocol {protocol} has {len(x)} test images; ask for at most "
                          f"{len(x)}")
    if fit_epochs > 0:
        xt, yt, _, _ = _images(model, protocol, seed, 'train')
        _fit(model, xt, yt, fit_epochs, seed, log=log)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:num]
    x, y = x[idx], y[idx]
    with torch.no_grad():
        model.eval()
        pred = model(x).argmax(1)
    titles = [f"label {int(a)} / pred {int(b)}" for a, b in zip(y, pred)]
    return plot_stn(model, x, out, mean[0], std[0], grid=grid, titles=titles)
