"""The photometric parameters of one view, as the host draws them and the device applies them.

A view's random choices are drawn once, on the host, with the recipes' distributions (torchvision's
``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``, ``RandomSolarize`` applied with their probabilities); the
crop and flip are applied there too, the colour steps either there or in batch on the accelerator. One row of
``PHOTOMETRIC_FIELDS`` floats per view travels beside its uint8 pixels. Torch-free.
"""

from dataclasses import dataclass

# ColorJitter's operations, numbered as torchvision numbers them in its random order (``fn_idx``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class PhotometricParams:
    """One view's drawn photometric choices; a factor of 1 (hue 0) or a flag of 0 means the step does nothing."""

    jitter: float  # 1.0 when ColorJitter applies (probability 0.8 in every recipe)
    brightness: float
    contrast: float
    saturation: float
    hue: float  # in [-0.5, 0.5], a fraction of the hue circle
    order: tuple[float, float, float, float]  # the jitter operations in the order they apply
    grayscale: float
    blur: float
    blur_sigma: float
    solarize: float

    def as_row(self) -> list[float]:
        """The parameters as one row of floats, in ``PHOTOMETRIC_FIELDS`` order (``order`` spread over 4 columns)."""
        return [self.jitter, self.brightness, self.contrast, self.saturation, self.hue, *self.order, self.grayscale,
                self.blur, self.blur_sigma, self.solarize]  # not astuple, which deep-copies every field

    @classmethod
    def from_row(cls, row) -> "PhotometricParams":
        values = [float(value) for value in row]
        return cls(*values[:5], tuple(values[5:9]), *values[9:])


PHOTOMETRIC_FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue", "order_1", "order_2", "order_3",
                      "order_4", "grayscale", "blur", "blur_sigma", "solarize")
IDENTITY = PhotometricParams(0.0, 1.0, 1.0, 1.0, 0.0, (0.0, 1.0, 2.0, 3.0), 0.0, 0.0, 1.0, 0.0)
