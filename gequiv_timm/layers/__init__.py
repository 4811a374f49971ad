"""Pure PyTorch building blocks. Nothing in this package imports timm."""
from .groups import GROUPS, Group, filter_indices, get_group, rotate_plane, transform_group_map, transform_plane
from .filter_basis import (
    FILTER_BASES, basis_size, count_parameters, default_filter_basis, expansion_map, rotation_maps,
)
from .fields import RandomField, centre
from .gconv import (
    EquivariantMixin, ExportedGroupConv2d, GroupAvgPool2d, GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool,
    P4ConvP4, P4ConvZ2, P4MConvP4M, P4MConvZ2, check_finite, check_group_input, export_group_convs, finite_check,
    fold_group, set_finite_check, stride_is_exact, unfold_group,
)
from .stem import EquivariantStem, PooledLift
from .stn import LocalisationCNN, ParallelSpatialTransformer, SpatialTransformer, TRANSFORMS, create_transform
from .pde import (
    CDEPdeLayerM2, ConvectionM2, DilationM2, ErosionM2, LiftM2Cartesian, LinearM2, MaxProjectM2, PDEStem,
    ReflectionPadM2, SumProjectM2, morphological_convolution_m2, rotate_m2,
)
from .morphology import morphological_convolution_r2
from .pde_native import morphology_backend, native_available, set_morphology_backend
from .pde_r2 import (
    CDEPdeLayerR2, ConvectionR2, DEPdeLayerR2, DilationR2, ErosionR2, LinearR2, MorphologicalConvolutionR2,
    SpatialResampleR2,
)
from .pde_nondiag import CDEPdeLayerM2NonDiag, DilationM2NonDiag, ErosionM2NonDiag
from .pde_m2_ops import (
    AnisotropicDilatedProjectM2, ConvectionDilationPdeM2, ConvectionErosionPdeM2, ConvM2Cartesian, DEPdeLayerM2,
    SpatialResampleM2,
)
from .rcn import (
    CoordRegressionHead, DenoisingKeypointModel, JointKeypointModel, RCNPaperTrunk, RecombinatorHead, SingleScaleHead,
    SumNetHead, argmax_keypoints, decode_heatmaps, heatmap_cross_entropy, soft_argmax_keypoints, spatial_softmax,
)
