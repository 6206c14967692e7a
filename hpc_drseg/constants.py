"""Constants shared by every layer: lesion order, normalisation, overlay colours (Jithesh et al., ICMLA 2025)."""

# Fixed channel order everywhere: data, loss, metrics, logs, reports.
LESIONS: tuple[str, ...] = ("MA", "EX", "SE", "HE")

LESION_NAMES: dict[str, str] = {
    "MA": "microaneurysms",
    "EX": "hard exudates",
    "SE": "soft exudates",
    "HE": "haemorrhages",
}

# ImageNet statistics on the 0-1 scale: the paper normalises with them for its ImageNet-initialised ResNet.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Overlay colours as in the paper's figures, RGB 0-255.
LESION_COLOURS: dict[str, tuple[int, int, int]] = {
    "MA": (255, 0, 0),  # red
    "EX": (0, 200, 0),  # green
    "SE": (110, 200, 255),  # light blue
    "HE": (0, 0, 255),  # blue
}

SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Exit status of `drseg train` stopped by a signal after writing its checkpoint (EX_TEMPFAIL): "resumable, run me
# again". slurm/train.sh keeps the literal (a test checks that it matches).
EXIT_RESUMABLE = 75
