"""Decoding one image file into a training sample for data_prep.build_shards.

Every image is decoded with Pillow (JPEG, PNG, WebP, BMP; EXIF orientation applied), converted to
RGB, its shorter side resized to N and centre-cropped to N x N (ImageOps.fit: crop to a square,
then one bicubic resize), and returned as uint8 N x N x 3. A file that cannot be used raises
UnreadableImage with the reason that goes into skipped.tsv.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


class UnreadableImage(Exception):
    """A listed file that is missing or cannot be decoded; the message is the skip reason."""


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 (N, N, 3): the image at `path`, shorter side resized to N, centre-cropped.
    Raises UnreadableImage with the reason when the file is missing, empty or not decodable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        num_bytes = os.path.getsize(path)
    except OSError as err:
        raise UnreadableImage("missing (gone since the input was listed)"
                              if isinstance(err, FileNotFoundError) else
                              f"cannot be read ({err.strerror})") from err
    if num_bytes == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            # JPEG: decode at the smallest 1/2^k scale whose shorter side is still >= N.
            width, height = img.size
            short = max(1, min(width, height))
            img.draft("RGB", (-(-width * size // short), -(-height * size // short)))
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC),
                              dtype=np.uint8)
    except UnidentifiedImageError as err:
        raise UnreadableImage(f"not an image ({'/'.join(IMAGE_FORMATS)})") from err
    # Pillow's decoders raise many types on malformed files (OSError for truncated data,
    # ValueError, SyntaxError, struct.error, DecompressionBombError, ...): all mean "skip it".
    except Exception as err:  # noqa: BLE001
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UnreadableImage(f"cannot be decoded ({reason})") from err
