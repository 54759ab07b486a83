"""Default configuration: a small CNN trained on two-digit numbers from scikit-learn's digits.

The 8x8 digits ship inside scikit-learn, so this runs on any machine with no internet. Each of the
100 numbers 00..99 is an identity, written as two digit images side by side (source digit_pairs,
facenet_jax/data/digits.py). 80 numbers train; 10 test numbers are never seen in training and
are written with digit images never seen in training either: verification on them is the
one-shot setting, where the embedding must separate people (numbers) it has never seen.
`configs/digits.py` is the harder single-digit variant (train on digits 0-6, verify on 7-9).

Variants (`configs/bfw.py`, `configs/smoke.py`, ...) import this file and override a few fields.
Any field can be overridden on the command line, e.g. `--config.train.margin=0.3`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, the PK sampler, augmentation and evaluation pairs.

    # ---------------------------------------------------------------- data
    data = config.data = ml_collections.ConfigDict()
    data.source = "digit_pairs"  # digit_pairs | digits (bundled) | folder (ROOT/<id>/<img>) | tfds.
    data.root = ""  # source=folder: the image tree ROOT/[<group>/]<identity>/<image> (or a zip).
    data.group_depth = 0  # source=folder: 1 when identities sit under group folders (BFW).
    data.tfds_name = ""  # source=tfds: a catalog name with image+label features, e.g. "mnist".
    data.tfds_split = "train"  # source=tfds: catalog split(s) to pool, e.g. "train+test".
    data.tfds_image_key = "image"  # source=tfds: the image feature.
    data.tfds_label_key = "label"  # source=tfds: the identity feature (ClassLabel, int or text).
    data.tfds_group_key = ""  # source=tfds: optional group feature, e.g. omniglot's "alphabet".
    data.data_dir = ""  # Where prepared ArrayRecord data is cached ("" = ~/tensorflow_datasets).
    data.prepare_workers = 0  # source=folder: processes decoding the folder once (0 = per core).
    data.train_classes = (0, 1, 2, 3, 4, 5, 6)  # source=digits: training identities.
    data.digit_pair_images = 60  # source=digit_pairs: images composed for each number.
    data.split_by = "identity"  # identity: disjoint identities per split | image: split images.
    data.split_seed = 0  # Seeds the identity-disjoint train/validation/test split.
    data.val_fraction = 0.1  # Fraction of identities held out for validation (not source=digits).
    data.test_fraction = 0.1  # Fraction of identities held out for test (not source=digits).
    data.image_size = 16  # Model input is image_size x image_size.
    data.channels = 1  # 1 = grey, 3 = RGB; images are converted on decode.
    data.crop = "none"  # none | center | detect (MTCNN box) | align (5 landmarks, ArcFace layout).
    data.detector = "mtcnn"  # crop=detect: mtcnn | haar (face_detection.DETECTORS); align: mtcnn.
    data.detect_margin = 0.2  # crop=detect: the square crop enlarges the face box by this fraction.
    data.align_margin = 0.0  # crop=align: crop side / ArcFace's (0 = ArcFace's, BFW's framing).
    data.center_crop_fraction = 1.0  # crop=center: side of the central square crop / image side.
    data.identities_per_batch = 6  # P: identities in each global batch (of 80 training numbers).
    data.images_per_identity = 16  # K (>= 2): images of each identity in each global batch.
    data.sample_with_replacement = True  # Identities with < K images: True resamples, False skips.
    data.min_images_per_identity = 2  # Identities with fewer images are excluded from training.
    data.augment = ("random_crop",)  # Any of: random_crop, flip, color, affine; () for none.
    # No flip here: a mirrored "37" is another glyph pair, not the same number.
    data.random_crop_padding = 2  # random_crop: pad by this many pixels, crop back to size.
    data.affine_degrees = 10.0  # affine: rotation about the centre drawn from U(-deg, deg).
    data.affine_scale = 0.1  # affine: zoom drawn log-uniform from [1 / (1 + s), 1 + s].
    data.rotation_classes = 1  # R in 1 | 2 | 4: each training identity also trains as R - 1 new
    # identities, its images turned by k * 360 / R degrees (Vinyals et al. 2016; characters only).
    data.groups_per_batch = 0  # G: each batch's P identities come from G groups, P / G each
    # (G = 1: within-group negatives only, as within-group impostors test); 0 = ignore groups.
    data.num_workers = 0  # Grain worker processes for decoding (0 = in the main process).
    data.prefetch = 2  # Batches prefetched ahead of the train step.

    # --------------------------------------------------------------- model
    model = config.model = ml_collections.ConfigDict()
    model.name = "small_cnn"  # Backbone, looked up in facenet_jax.models.MODELS.
    model.width = 16  # Channels of the first conv stage; later stages double it.
    model.pooling = "avg"  # Head pooling: avg (global average) | flatten (keeps the layout).
    model.embedding_dim = 128  # d: size of the L2-normalised embedding.
    model.dtype = "float32"  # Compute dtype of convs/matmuls: float32 or bfloat16 (params f32).

    # --------------------------------------------------------------- train
    train = config.train = ml_collections.ConfigDict()
    train.num_steps = 600  # Optimiser steps.
    train.optimizer = "adam"  # adam | adamw | sgd (momentum 0.9, Nesterov).
    train.learning_rate = 3e-3  # Peak learning rate.
    train.schedule = "warmup_cosine"  # constant | cosine | warmup_cosine.
    train.warmup_steps = 50  # Linear warm-up steps (warmup_cosine).
    train.weight_decay = 1e-4  # Decoupled weight decay (adamw) or L2 (sgd); ignored by adam.
    train.grad_clip_norm = 0.0  # Clip the global gradient norm to this value (0 = no clipping).
    train.on_nonfinite = "stop"  # NaN/inf loss, gradients or state: stop (exit 1) | skip the step.
    train.max_nonfinite_skips = 10  # on_nonfinite=skip: stop after this many such steps in a row.
    # Objective: terms joined by "+", each weighted by loss_weights (docs/losses.md). triplet
    # (FaceNet) and at most one margin-softmax kind over the training identities: softmax |
    # normface | cosface | arcface; e.g. "cosface" alone or "triplet+arcface" (joint).
    train.loss = "triplet"
    train.loss_weights = ()  # One weight per term of train.loss, in its order; () = all 1.0.
    train.margin_scale = 30.0  # s: logit scale of normface / cosface / arcface (not softmax).
    # m: cosface's cosine margin (typical 0.35) or arcface's angle margin in radians (typical 0.5).
    train.margin_m = 0.35  # Ignored by softmax and normface, which have no margin.
    train.easy_margin = False  # arcface only: margin only where cos(theta) > 0 (insightface).
    train.margin = 0.2  # Triplet: alpha in ||f(a)-f(p)||^2 + alpha < ||f(a)-f(n)||^2.
    train.mining = "semi_hard"  # Triplet strategy, see facenet_jax.losses.STRATEGIES.
    train.squared = True  # Mine and penalise squared Euclidean distances (FaceNet) or plain ones.
    train.soft = False  # batch_hard only: softplus instead of hinge (Hermans et al. 2017).
    train.mining_scope = "global"  # global: mine against the whole global batch; local: per device.
    train.log_every = 50  # Steps between metric logs (metrics.jsonl, TensorBoard, terminal).
    train.checkpoint_every = 200  # Steps between checkpoints (and one at the end).
    train.keep_checkpoints = 2  # Checkpoints kept in WORKDIR/checkpoints.
    train.eval_every = 0  # Steps between evaluations during training (0 = only at the end).
    train.progress_bar = True  # tqdm progress bar on the terminal.

    # ---------------------------------------------------------------- eval
    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.split = "test"  # Split embedded for verification: test (unseen identities) | val.
    evaluation.num_pairs = 3000  # Same/different pairs drawn from the split (half of each).
    evaluation.num_folds = 10  # Folds for accuracy with the threshold tuned on the other folds.
    evaluation.batch_size = 256  # Images per embedding batch (padded with the ignore label).
    evaluation.baseline = True  # Also evaluate the untrained network (step 0) for comparison.
    # Test-time mirror averaging, embedding = l2_normalize(f(x) + f(mirror(x))): the run's own
    # evaluation, its threshold and every CLI command of the run (--flip / --no-flip override).
    evaluation.flip = False

    return config
