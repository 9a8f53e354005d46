"""The image processor of an hf_siamese encoder: the evaluation view, in the model's number of channels.

Resize the short side to ``size["shortest_edge"]`` (the trained size / crop_pct), centre crop to ``crop_size``,
rescale to [0, 1], normalise with the training mean/std. Unlike transformers' stock processors it converts images
to grayscale for one-channel models (``pipeline`` loads every image as RGB). Imports only transformers, so that it
ships with the weights for ``trust_remote_code``.
"""

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import ImagesKwargs
from transformers.image_utils import PILImageResampling


class SiameseImageProcessorKwargs(ImagesKwargs, total=False):
    num_channels: int


class SiameseImageProcessor(PilBackend):
    valid_kwargs = SiameseImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    num_channels = 3

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs):
        if self.num_channels == 1:
            image, do_convert_rgb = _grayscale(image), False
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format,
                                     **kwargs)


def _grayscale(image):
    if isinstance(image, Image.Image):
        return image.convert("L")
    array = np.asarray(image)
    if array.ndim == 2:
        return array
    raise ValueError(
        f"This model takes one-channel images: pass PIL images or [H, W] arrays, got an array of shape {array.shape}."
    )


__all__ = ["SiameseImageProcessor"]
