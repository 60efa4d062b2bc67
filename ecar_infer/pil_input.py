"""PIL images as the models read them: 8 bits per channel, opaque, in the model's channels.

One rule for every image a user gives (an image to edit, a training image): transparency (RGBA, LA, PA,
a palette with a transparent colour) is composited on white, as the emoji data set is; 16-bit grayscale
(mode I;16, what Pillow opens a 16-bit PNG or TIFF as, and mode I of a 16-bit PGM, which Pillow scales to
0..65535 whatever its maximum) is scaled to 8 bits (Pillow's own conversion would clip every value above
255 to white); then L for 1-channel models, RGB for 3-channel ones.
"""
from __future__ import annotations

import numpy as np


def as_model_image(image, channels: int):
    """A PIL image in mode L (channels 1) or RGB (channels 3), by the rules above."""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PPM"):
        scaled = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("L" if channels == 1 else "RGB")
