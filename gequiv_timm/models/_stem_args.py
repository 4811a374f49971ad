"""The stem models' constructor arguments and minimum input sizes (``gequiv_p4_*`` / ``gequiv_p4m_*`` in
:mod:`gequiv_timm.models.stems`, ``gequiv_pde_resnet18`` in :mod:`gequiv_timm.models.pde`): a timm backbone whose stem
is replaced keeps the rest of its layers, so its smallest input is the new stem's reduction times what the rest of
the backbone needs."""
from __future__ import annotations

from ..layers.pde import PDEStem
from ..layers.stem import EquivariantStem
from ._args import check_choice, check_int

__all__ = ['STEM_STRIDES', 'BACKBONE_MIN_AFTER_STEM', 'backbone_min_after_stem', 'check_stem_args',
           'equivariant_stem_min_size', 'pde_stem_min_size']

STEM_STRIDES = (1, 2, 4)

# The smallest side of the stem's output that the rest of each backbone accepts (measured; the input-policy test,
# tests/models/test_input_policy.py, checks that every registered model's minimum is tight). ConvNeXt downsamples
# three times with unpadded 2x2 convolutions after its stem; the others are padded throughout.
BACKBONE_MIN_AFTER_STEM = {'resnet18': 1, 'resnet50': 1, 'convnext_tiny': 8, 'efficientnet_b0': 1,
                           'regnety_016': 1}


def backbone_min_after_stem(backbone: str) -> int:
    """:data:`BACKBONE_MIN_AFTER_STEM` of ``backbone``; 1 for a backbone not listed there (its own layers then refuse
    what they cannot take, with torch's messages)."""
    return BACKBONE_MIN_AFTER_STEM.get(backbone, 1)


def check_stem_args(owner: str, *, mode: str, width, kernel_size, depth, stride, group_pool, proj=True,
                    prefix: str = 'stem_') -> None:
    """The equivariant stem's arguments, checked before anything is built (``None``: the default taken from the
    backbone's stem; ``0`` is a value and is refused). ``prefix``: how the caller names them (``stem_width``)."""
    check_choice(owner, 'mode', mode, ('invariant', 'equivariant'))
    check_int(owner, prefix + 'width', width, 1, none_ok=True, what="fields; None: the stem conv's channels / |G|")
    check_int(owner, prefix + 'kernel_size', kernel_size, 1, odd=True, none_ok=True,
              what="None: the stem conv's, made odd")
    check_int(owner, prefix + 'depth', depth, 0, what='group convolutions after the lift')
    check_int(owner, prefix + 'stride', stride, choices=STEM_STRIDES, none_ok=True,
              what="None: the stem conv's stride")
    check_choice(owner, prefix + 'group_pool', group_pool, ('max', 'mean'))
    check_choice(owner, prefix + 'proj', proj, (True, False))


def equivariant_stem_min_size(stem: EquivariantStem, backbone: str) -> int:
    """The lift pools by ``stride`` (an input side ``>= stride`` gives ``floor(H / stride)``), so the model needs
    ``stride * (the backbone's minimum after the stem)``."""
    return stem.stride * backbone_min_after_stem(backbone)


def pde_stem_min_size(stem: PDEStem, backbone: str) -> int:
    """A CDE layer needs a 2x2 map (the lift keeps the size); the stem's max pool (ceil mode) gives
    ``ceil(H / stride)``, which must reach the backbone's minimum after the stem."""
    return max(2 if len(stem.layers) else 1, stem.stride * (backbone_min_after_stem(backbone) - 1) + 1)
