"""The U-Net of the TF segmentation tutorial: a VGG16 encoder and a transposed-convolution decoder.

Layer names
-----------
Encoder layers keep the Keras VGG16 names (``block{b}_conv{c}``, ``block{b}_pool``), so a VGG16
weights file and :data:`ENCODER_SKIPS` speak the same language. Each name in :data:`ENCODER_SKIPS`
is always the layer whose output is the skip connection, in both encoder variants:

* plain VGG16 (``encoder_batch_norm=False``): ``block1_conv1`` is the Conv2D with its ReLU, as in
  ``tf.keras.applications.VGG16``;
* VGG16-BN (``encoder_batch_norm=True``): the unit is ``block1_conv1_conv`` (Conv2D, linear) ->
  ``block1_conv1_bn`` (BatchNormalization) -> ``block1_conv1`` (ReLU). The conv keeps its bias so
  that pretrained VGG16 kernels and biases can still be copied into it.

Decoder level ``i`` (0 = full resolution) is ``decoder{i}_up`` (Conv2DTranspose) ->
``decoder{i}_concat`` -> ``decoder{i}_bn`` -> ``decoder{i}_relu`` -> ``decoder{i}_conv1`` ->
``decoder{i}_conv2``; the bottleneck dropout is ``bottleneck_dropout`` and the 1x1 classifier is
``head``, which returns float32 logits.

:func:`build_unet` is the one factory; it joins the parts those names describe:
:func:`_vgg16_encoder` (blocks from :data:`_VGG16_BLOCKS`, skips from :data:`ENCODER_SKIPS`),
:func:`_decoder_block` per level, and :func:`_head`.

This module imports TensorFlow only inside functions: :func:`validate_unet_args` is usable by the
config layer on machines (the Spark driver, CI) where TensorFlow is not installed.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorflow as tf

#: VGG16 layers whose outputs are the U-Net skips, shallowest first; level ``i`` of the decoder
#: concatenates ``ENCODER_SKIPS[i]``, and ``ENCODER_SKIPS[n_depth - 1]`` is the bottleneck.
ENCODER_SKIPS: tuple[str, ...] = ("block1_conv1", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3")

#: VGG16's convolutions per block and their widths (``tf.keras.applications.VGG16``).
_VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))

#: encoder_weights keywords; anything else must be a path to an existing .h5 file.
ENCODER_WEIGHT_KEYWORDS: tuple[str, ...] = ("imagenet", "none")
_H5_SUFFIXES = (".h5", ".hdf5")
#: The file tf.keras.applications.VGG16(include_top=False, weights="imagenet") downloads and caches.
_IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def is_pretrained(encoder_weights: str) -> bool:
    """Return True when ``encoder_weights`` names pretrained weights ("imagenet" or a .h5 path).

    Parameters
    ----------
    encoder_weights
        "imagenet", "none" or a path to a local .h5 file (not checked here; see
        :func:`validate_unet_args`).
    """
    return str(encoder_weights).strip().lower() != "none"


#: model.width when unset and training from scratch: VGG16's shape at half its channels, about a
#: quarter of the FLOPs (13.3 against 3.4 training images/s at 128x128 on 2 CPU cores, batch 8), so
#: a fixed time budget trains four times the epochs; see the README's "Training from scratch".
FROM_SCRATCH_WIDTH = 0.5


def resolved_width(width: float | None, *, encoder_weights: str) -> float:
    """The channel multiplier to build with: ``width``, or when None 1.0 if pretrained, else :data:`FROM_SCRATCH_WIDTH`."""
    if width is not None:
        return width
    return 1.0 if is_pretrained(encoder_weights) else FROM_SCRATCH_WIDTH


def _resolve_auto_bool(value: str | bool, *, auto: bool, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return auto
    if text in ("true", "false"):
        # The config layer stores these as strings so that YAML can also say "auto".
        return text == "true"
    raise ValueError(f"{name}={value!r} is not allowed; use 'auto', True or False")


def _nearest_multiples(value: int, step: int) -> list[int]:
    below = (value // step) * step
    candidates = [below, below + step] if below >= step else [step]
    return [c for c in candidates if c != value]


def validate_unet_args(
    *,
    image_size: int,
    n_depth: int,
    encoder_weights: str,
    n_classes: int = 3,
    dropout: float = 0.5,
    freeze_encoder: str | bool = "auto",
    encoder_batch_norm: str | bool = "auto",
    width: float = 1.0,
    batch_norm_momentum: float = 0.9,
) -> None:
    """Check the U-Net arguments without TensorFlow, so configs fail before any Spark or TF work.

    Parameters
    ----------
    image_size
        Square input side in pixels; must be divisible by ``2 ** (n_depth - 1)`` because the encoder
        halves the resolution ``n_depth - 1`` times and the decoder must double back exactly.
    n_depth
        Number of VGG16 blocks used, 1..5.
    encoder_weights
        "imagenet", "none" or a path to an existing local ``.h5``/``.hdf5`` file.
    n_classes
        Output classes, at least 2.
    dropout
        Bottleneck dropout rate in [0, 1).
    freeze_encoder, encoder_batch_norm
        "auto", True or False (also the strings "true"/"false").
    width, batch_norm_momentum
        See :func:`build_unet`.

    Raises
    ------
    ValueError
        Naming the bad value and the allowed values or the fix.
    """
    if isinstance(n_depth, bool) or not isinstance(n_depth, int) or not 1 <= n_depth <= len(ENCODER_SKIPS):
        raise ValueError(
            f"n_depth={n_depth!r} is not allowed; use an integer from 1 to {len(ENCODER_SKIPS)} "
            f"(the number of VGG16 blocks, skips {', '.join(ENCODER_SKIPS)})"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} is not allowed; use a positive integer such as 128")
    step = 2 ** (n_depth - 1)
    if image_size % step:
        sizes = " or ".join(str(s) for s in _nearest_multiples(image_size, step))
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**(n_depth-1) = {step} for n_depth={n_depth}: "
            f"the encoder halves the resolution {n_depth - 1} times; use image_size {sizes}, "
            f"or a smaller n_depth"
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes={n_classes!r} is not allowed; use an integer >= 2 (the pet recipe uses 3)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not allowed; use a rate in [0, 1), e.g. 0.5 as the recipe")
    for name, value in (("freeze_encoder", freeze_encoder), ("encoder_batch_norm", encoder_batch_norm)):
        _resolve_auto_bool(value, auto=False, name=name)
    _validate_encoder_weights(encoder_weights)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width <= 1.0:
        raise ValueError(f"width={width!r} is not allowed; use a multiplier of VGG16's channels in (0, 1], e.g. 0.5")
    if width != 1.0 and is_pretrained(encoder_weights):
        raise ValueError(
            f"width={width} needs encoder_weights='none': pretrained VGG16 weights ({encoder_weights!r}) have "
            f"VGG16's own channel counts; use width 1.0 with them"
        )
    if isinstance(batch_norm_momentum, bool) or not isinstance(batch_norm_momentum, (int, float)) \
            or not 0.0 <= batch_norm_momentum < 1.0:
        raise ValueError(f"batch_norm_momentum={batch_norm_momentum!r} is not allowed; use a number in [0, 1), "
                         f"e.g. 0.9")


def _validate_encoder_weights(encoder_weights: str) -> None:
    allowed = "'imagenet', 'none' or a path to a local .h5 file"
    if not isinstance(encoder_weights, (str, os.PathLike)):
        raise ValueError(f"encoder_weights={encoder_weights!r} is not allowed; use {allowed}")
    text = os.fspath(encoder_weights)
    if text.strip().lower() in ENCODER_WEIGHT_KEYWORDS:
        return
    looks_like_path = text.lower().endswith(_H5_SUFFIXES) or os.sep in text or os.path.exists(text)
    if not looks_like_path:
        raise ValueError(f"encoder_weights={text!r} is not a known keyword; use {allowed}")
    if not text.lower().endswith(_H5_SUFFIXES):
        raise ValueError(
            f"encoder_weights={text!r} is not a .h5 file; save VGG16 weights in HDF5, e.g. "
            f"tf.keras.applications.VGG16(include_top=False, weights=None).save_weights('vgg16.h5'), "
            f"or use 'imagenet' / 'none'"
        )
    if not os.path.isfile(text):
        raise ValueError(
            f"encoder_weights={text!r} does not exist (or is not a file); give the path of a local .h5 file "
            f"readable on every worker, or use 'imagenet' / 'none'"
        )


def keras_module() -> Any:
    """Return ``tf.keras`` after checking that it is tf-keras (Keras 2).

    Raises
    ------
    RuntimeError
        When ``tf.keras`` resolves to Keras 3, i.e. ``TF_USE_LEGACY_KERAS=1`` was not set before
        TensorFlow was first imported.
    """
    import tensorflow as tf

    keras = tf.keras
    # tf-keras 2.21 exposes no __version__ on the tf.keras proxy (Keras 3 does), so fall back to the
    # tf_keras package when the proxy points at it.
    version = getattr(keras, "__version__", None)
    if version is None and getattr(keras, "__name__", "").startswith("tf_keras"):
        import tf_keras

        version = tf_keras.__version__
    if not str(version).startswith("2."):
        raise RuntimeError(
            f"tf.keras is Keras {version}, but petseg needs tf-keras (Keras 2): set the environment variable "
            f"TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported (e.g. at the top of the entry point, "
            f"or via petseg.config), and install tf-keras matching TensorFlow"
        )
    return keras


def fetch_imagenet_weights() -> None:
    """Download (or find in Keras' cache) VGG16's ImageNet weights in this process.

    Raises
    ------
    RuntimeError
        When they cannot be downloaded, saying how to provide them on a machine without internet.
    """
    _pretrained_encoder_weights("imagenet", [])


def _pretrained_encoder_weights(encoder_weights: str, names: list[str]) -> dict[str, list[Any]]:
    """Load VGG16 conv weights (kernel, bias) for ``names`` from ImageNet or a local .h5 file."""
    keras = keras_module()
    if encoder_weights.strip().lower() == "imagenet":
        # The applications API downloads and caches the no-top file in ~/.keras/models.
        try:
            source = keras.applications.VGG16(include_top=False, weights="imagenet")
        except Exception as exc:  # get_file raises a bare Exception on network errors
            raise RuntimeError(
                f"encoder_weights='imagenet' could not be downloaded ({exc}); on a machine without internet, "
                f"copy {_IMAGENET_NOTOP_FILE} into ~/.keras/models/ or pass its local path as encoder_weights"
            ) from exc
    else:
        source = keras.applications.VGG16(include_top=False, weights=None)
        before = {n: source.get_layer(n).get_weights()[0].copy() for n in names}
        # by_name accepts the Keras no-top and with-top VGG16 files as well as weights saved from a
        # (plain-encoder) petseg U-Net; topological loading (weights=path) accepts only the no-top file.
        try:
            source.load_weights(encoder_weights, by_name=True)
        except (ValueError, IndexError, KeyError, OSError) as exc:
            # e.g. a VGG16-BN U-Net's file, where block1_conv1 is a weightless ReLU.
            raise ValueError(
                f"encoder_weights={encoder_weights!r} could not be loaded into VGG16 by layer name ({exc!r}); "
                f"give a .h5 file saved from tf.keras.applications.VGG16 or a plain-encoder petseg U-Net"
            ) from exc
        missing = [n for n in names if (source.get_layer(n).get_weights()[0] == before[n]).all()]
        if missing:
            raise ValueError(
                f"encoder_weights={encoder_weights!r} holds no weights for the VGG16 layers {missing}; give a "
                f"file saved from tf.keras.applications.VGG16 (layer names block1_conv1 ... block5_conv3)"
            )
    return {n: source.get_layer(n).get_weights() for n in names}


def build_unet(
    *,
    image_size: int,
    n_classes: int = 3,
    n_depth: int = 5,
    encoder_weights: str = "none",
    freeze_encoder: str | bool = "auto",
    encoder_batch_norm: str | bool = "auto",
    dropout: float = 0.5,
    width: float = 1.0,
    batch_norm_momentum: float = 0.9,
    seed: int | None = None,
) -> "tf.keras.Model":
    """Build the tutorial's VGG16 U-Net, returning per-pixel logits.

    Parameters
    ----------
    image_size
        Square input side; divisible by ``2 ** (n_depth - 1)``.
    n_classes
        Output channels of the head (3 for pet / background / border).
    n_depth
        VGG16 blocks used (1..5); only those blocks are built. 5 is the tutorial's model.
    encoder_weights
        "imagenet" (downloaded by ``tf.keras.applications.VGG16``), a path to a local .h5 file of
        VGG16 weights (loaded by layer name), or "none" for random He initialisation.
    freeze_encoder
        "auto": frozen when pretrained, trainable when "none"; True/False force it.
    encoder_batch_norm
        "auto": the VGG16-BN variant when ``encoder_weights="none"`` (measured on synthetic pets,
        32 px, n_depth 3: as accurate as plain VGG16 at lr 1e-3 and still converging at 3e-3 where
        plain VGG16 fell behind), plain VGG16 when pretrained (its weights were trained without
        BN); True/False force it.
    dropout
        Bottleneck dropout rate.
    width
        Multiplier of VGG16's channels (64 ... 512), rounded to multiples of 8: the same blocks,
        depth and skip table at a fraction of the cost (0.5 costs about a quarter of the FLOPs).
        Only with ``encoder_weights="none"``: pretrained weights have VGG16's own widths.
    batch_norm_momentum
        Momentum of every BatchNormalization's moving statistics, which inference and validation
        use. 0.9 (PyTorch's default; Keras's is 0.99) lets them follow the weights within about
        ten steps: at 0.99 a from-scratch run's first epochs over a small dataset (tens of steps
        each) validate with statistics still mostly those of the random initial weights, measured
        on the training images after 40 steps as 0.43 pixel accuracy in inference mode against
        0.87 in training mode (0.89 with 0.9).
    seed
        Seeds the initialisers and the dropout for a reproducible model; None for random.

    Returns
    -------
    tf.keras.Model
        Input ``(None, image_size, image_size, 3)`` float32 already preprocessed with
        :func:`petseg.model.preprocessing.preprocess`; output ``(None, image_size, image_size,
        n_classes)`` float32 logits (no softmax), float32 also under a mixed-precision policy.

    Raises
    ------
    ValueError
        See :func:`validate_unet_args`; also when a .h5 file lacks the needed VGG16 layers.
    RuntimeError
        When ``tf.keras`` is Keras 3 (set ``TF_USE_LEGACY_KERAS=1`` before importing TensorFlow), or
        when the ImageNet weights cannot be downloaded.
    """
    validate_unet_args(
        image_size=image_size,
        n_depth=n_depth,
        encoder_weights=encoder_weights,
        n_classes=n_classes,
        dropout=dropout,
        freeze_encoder=freeze_encoder,
        encoder_batch_norm=encoder_batch_norm,
        width=width,
        batch_norm_momentum=batch_norm_momentum,
    )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed={seed!r} is not allowed; use a non-negative integer, or None for a random model")
    keras = keras_module()
    encoder_weights = os.fspath(encoder_weights)
    pretrained = is_pretrained(encoder_weights)
    frozen = _resolve_auto_bool(freeze_encoder, auto=pretrained, name="freeze_encoder")
    use_bn = _resolve_auto_bool(encoder_batch_norm, auto=not pretrained, name="encoder_batch_norm")
    init = _Initializers(keras=keras, seed=seed)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    encoder = _vgg16_encoder(inputs, keras=keras, n_depth=n_depth, width=width, use_bn=use_bn,
                             batch_norm_momentum=batch_norm_momentum, init=init)
    if pretrained:
        _copy_pretrained_weights(encoder, encoder_weights=encoder_weights, use_bn=use_bn)
    for layer in encoder.layers:
        layer.trainable = not frozen

    x = keras.layers.Dropout(dropout, seed=seed, name="bottleneck_dropout")(encoder.skips[-1])
    for level in reversed(range(n_depth - 1)):
        x = _decoder_block(x, encoder.skips[level], keras=keras, level=level,
                           filters=encoder.skips[level + 1].shape[-1] // 2,
                           batch_norm_momentum=batch_norm_momentum, init=init)
    outputs = _head(x, keras=keras, n_classes=n_classes, init=init)
    return keras.Model(inputs, outputs, name=f"unet_vgg16{'_bn' if use_bn else ''}_d{n_depth}")


class _Initializers:
    """The kernel initialisers of one model, seeded from one sequence when the model is seeded.

    Parameters
    ----------
    keras
        ``tf.keras`` (tf-keras), from :func:`keras_module`.
    seed
        The model's seed; None for random initialisers.
    """

    def __init__(self, *, keras: Any, seed: int | None) -> None:
        self._keras = keras
        self._seed = seed
        # One seed per layer: a seeded initialiser repeats its values on every call. The layers
        # draw them in building order, so a seed gives the same model every time.
        self._seeds = itertools.count(1_000 * (seed or 0))

    def _next_seed(self) -> int | None:
        return None if self._seed is None else next(self._seeds)

    def he(self) -> Any:
        """He-normal, for the ReLU convolutions."""
        return self._keras.initializers.HeNormal(seed=self._next_seed())

    def glorot(self) -> Any:
        """Glorot-uniform, for the linear head."""
        return self._keras.initializers.GlorotUniform(seed=self._next_seed())


@dataclass
class _Encoder:
    """What the decoder and the weight loading need of a built encoder.

    Attributes
    ----------
    layers
        Every encoder layer, to freeze or unfreeze.
    skips
        The outputs of the :data:`ENCODER_SKIPS` layers built, shallowest first; the last is the bottleneck.
    conv_names
        The VGG16 names of the convolution units built, in order: the weights a pretrained file must hold.
    """

    layers: list[Any] = field(default_factory=list)
    skips: list[Any] = field(default_factory=list)
    conv_names: list[str] = field(default_factory=list)


def _vgg16_encoder(
    x: Any, *, keras: Any, n_depth: int, width: float, use_bn: bool, batch_norm_momentum: float, init: _Initializers
) -> _Encoder:
    """The first ``n_depth`` VGG16 blocks over the input ``x``, under VGG16's layer names.

    Parameters
    ----------
    x
        The model's input tensor.
    keras
        ``tf.keras`` (tf-keras).
    n_depth, width, batch_norm_momentum
        See :func:`build_unet`.
    use_bn
        Build each convolution as the VGG16-BN unit (see the module's "Layer names").
    init
        The model's initialisers.

    Returns
    -------
    _Encoder
        Its layers, skip tensors and convolution names.
    """
    encoder = _Encoder()
    for b, (n_convs, vgg_filters) in enumerate(_VGG16_BLOCKS[:n_depth], start=1):
        filters = max(8, round(vgg_filters * width / 8) * 8)
        if b > 1:
            pool = keras.layers.MaxPooling2D(2, strides=2, name=f"block{b - 1}_pool")
            encoder.layers.append(pool)
            x = pool(x)
        for c in range(1, n_convs + 1):
            name = f"block{b}_conv{c}"
            unit = _encoder_conv_unit(keras=keras, name=name, filters=filters, use_bn=use_bn,
                                      batch_norm_momentum=batch_norm_momentum, init=init)
            encoder.layers += unit
            for layer in unit:
                x = layer(x)
            encoder.conv_names.append(name)
            if name == ENCODER_SKIPS[b - 1]:
                encoder.skips.append(x)
                if b == n_depth:
                    break  # deeper convs of the last block feed nothing (block1_conv2 when n_depth=1)
    return encoder


def _encoder_conv_unit(
    *, keras: Any, name: str, filters: int, use_bn: bool, batch_norm_momentum: float, init: _Initializers
) -> list[Any]:
    """One encoder convolution: a Conv2D with its ReLU, or Conv2D -> BatchNormalization -> ReLU;
    either way the unit's output layer is called ``name``."""
    layers = keras.layers
    if not use_bn:
        return [layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer=init.he(), name=name)]
    return [
        layers.Conv2D(filters, 3, padding="same", kernel_initializer=init.he(), name=f"{name}_conv"),
        layers.BatchNormalization(momentum=batch_norm_momentum, name=f"{name}_bn"),
        layers.ReLU(name=name),
    ]


def _copy_pretrained_weights(encoder: _Encoder, *, encoder_weights: str, use_bn: bool) -> None:
    """Copy VGG16's kernels and biases from ``encoder_weights`` (see :func:`build_unet`) into ``encoder``'s convs."""
    weights = _pretrained_encoder_weights(encoder_weights, encoder.conv_names)
    for name, values in weights.items():
        target = f"{name}_conv" if use_bn else name
        next(layer for layer in encoder.layers if layer.name == target).set_weights(values)


def _decoder_block(
    x: Any, skip: Any, *, keras: Any, level: int, filters: int, batch_norm_momentum: float, init: _Initializers
) -> Any:
    """Decoder level ``level``: double ``x``'s resolution, join the encoder's ``skip`` of that
    resolution, normalise, then two ReLU convolutions of ``filters`` channels.

    Returns
    -------
    tf.Tensor
        The level's output, at the resolution of ``skip``.
    """
    layers = keras.layers
    x = layers.Conv2DTranspose(
        filters, 3, strides=2, padding="same", kernel_initializer=init.he(), name=f"decoder{level}_up"
    )(x)
    x = layers.Concatenate(name=f"decoder{level}_concat")([x, skip])
    x = layers.BatchNormalization(momentum=batch_norm_momentum, name=f"decoder{level}_bn")(x)
    x = layers.ReLU(name=f"decoder{level}_relu")(x)
    for c in (1, 2):
        x = layers.Conv2D(
            filters, 3, padding="same", activation="relu", kernel_initializer=init.he(), name=f"decoder{level}_conv{c}"
        )(x)
    return x


def _head(x: Any, *, keras: Any, n_classes: int, init: _Initializers) -> Any:
    """The 1x1 classifier ``head``: ``n_classes`` float32 logits per pixel."""
    # float32 head: logits feed a softmax inside the loss, which must not run in float16/bfloat16.
    return keras.layers.Conv2D(n_classes, 1, kernel_initializer=init.glorot(), dtype="float32", name="head")(x)
