"""Single digits: train on scikit-learn's digits 0-6, verify on the never-seen digits 7-9.

Harder than the default: with only 7 training identities the embedding tends to map each unseen
digit onto the training digit it resembles most (README: "Single unseen digits"). 32x32 inputs and
a large margin are the settings that generalised best in our sweep.
"""

from configs import default


def get_config():
    config = default.get_config()
    d = config.data
    d.source = "digits"  # scikit-learn's bundled 8x8 digits, one identity per digit.
    d.train_classes = (0, 1, 2, 3, 4, 5, 6)  # Training identities; 7-9 are never seen.
    d.image_size = 32  # 8x8 digits upsampled to 32x32: finer feature maps before pooling.
    d.identities_per_batch = 6  # P: 6 of the 7 training digits per batch.
    d.augment = ("random_crop", "flip")  # Flip regularises this 7-identity run (README).
    config.train.margin = 1.0  # A wide margin spreads the 7 clusters; 0.2 barely beat untrained.
    return config
