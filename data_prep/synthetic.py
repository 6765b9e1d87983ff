"""python -m data_prep.synthetic: a synthetic dataset with families of confusable classes.

Shapes in names: c classes, n samples per class, m = c * n samples, L latent dims, H hidden
units, d vector dims, k stream words, R = 8 low-resolution pixels, S image size, C = 3 colours.

The generative model, every random number drawn from a stream keyed by (seed, purpose, id)::

    family centre_L  = unit(normal_L)                    stream (seed, FAMILY, id // family_size)
    class centre_L   = family centre_L + SPREAD * unit(normal_L)       stream (seed, CLASS, id)
    sample i of a split: z_L = class centre_L + NOISE * normal_L   row i of (seed, NOISE+split, id)
    vector_d         = tanh(z_L @ W1_LH + b1_H) @ W2_Hd   float32; W1, b1, W2 from the seed alone
    image_SSC        = bilinear_upsample(sigmoid(vector_d @ R_d(RRC))) * 255 + uniform noise
                       (uint8; pixel noise is row i of stream (seed, PIXELS+split, id))

Classes of one family sit SPREAD from a shared centre: confusable with each other but separable;
families are random directions, far apart on average. The streams are counter-based (splitmix64
of key + index), so a class's samples do not depend on how many classes there are or which are
generated together: `--grow-from OLD --new-classes N` regenerates OLD's classes bit for bit and
appends N new ones. To make that hold for the matrix products too (BLAS results may depend on
the matrix height), classes are always processed in the same aligned chunks of class ids,
computed in full even past C, so old and grown datasets multiply identical operands. Bitwise
equality therefore holds on the same numpy/BLAS build; across builds, to float32 rounding.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.format import Ancestor, DatasetError, DatasetInfo, load_dataset_info
from data_prep.lineage import child_lineage
from data_prep.writer import DatasetWriter

GENERATOR_NAME = "data_prep.synthetic"
GENERATOR_VERSION = 1
MAX_LATENT_DIM = 32
HIDDEN_DIM = 64
CLASS_SPREAD = 0.35     # distance of a class centre from its family centre (family centres: norm 1)
NOISE_STD = 0.09        # per latent dimension: same-family classes overlap a little
LOW_RES = 8             # images are rendered at LOW_RES x LOW_RES x 3, then upsampled
PIXEL_NOISE = 12        # uniform pixel noise amplitude, in 0..255 units
# Samples per chunk (train + val); chunks hold whole classes and depend only on the generator
# parameters, never on the number of classes (see the module docstring).
CHUNK_SAMPLES = {"vectors": 65536, "images": 2048}
_SPLIT_CODE = {"train": 0, "val": 1}
_FAMILY, _CLASS, _NOISE, _PIXELS = 1, 2, 16, 32   # stream purposes; + split code for per-sample
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines a class's samples, apart from its id."""

    seed: int = 0
    dim: int = 128
    kind: str = "vectors"
    per_class: int = 10
    val_per_class: int = 2
    family_size: int = 16
    image_size: int = 32

    def __post_init__(self) -> None:
        checks = {"seed": self.seed >= 0, "dim": self.dim >= 1, "per_class": self.per_class >= 1,
                  "val_per_class": self.val_per_class >= 0, "family_size": self.family_size >= 1,
                  "image_size": self.image_size >= LOW_RES,
                  "kind": self.kind in ("vectors", "images")}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid synthetic parameter(s) {bad}: {self}")

    @property
    def latent_dim(self) -> int:
        return min(self.dim, MAX_LATENT_DIM)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "vectors":
            return (self.dim,)
        return (self.image_size, self.image_size, 3)

    @property
    def chunk_classes(self) -> int:
        return max(1, CHUNK_SAMPLES[self.kind] // (self.per_class + self.val_per_class))


def class_key(class_id: int) -> str:
    """The classes.tsv key of a synthetic class, e.g. c0000123."""
    return f"c{class_id:07d}"


def _mix64(x_u64: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise; uint64 array arithmetic wraps modulo 2**64."""
    x_u64 = (x_u64 ^ (x_u64 >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x_u64 = (x_u64 ^ (x_u64 >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x_u64 ^ (x_u64 >> np.uint64(31))


def _stream_bits(seed: int, purpose: int, ids_c: np.ndarray, count: int) -> np.ndarray:
    """uint64 (c, k=count): the first `count` words of the splitmix64 stream keyed by
    (seed, purpose, id) for each id; word j does not depend on `count`."""
    base_1 = _mix64(np.array([seed], np.uint64) * _GOLDEN + np.uint64(purpose))
    keys_c = _mix64(base_1 ^ _mix64(ids_c.astype(np.uint64) + _GOLDEN))
    steps_k = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    return _mix64(keys_c[:, None] + steps_k[None, :])


def _stream_normals(seed: int, purpose: int, ids_c: np.ndarray, count: int) -> np.ndarray:
    """float32 (c, count) standard normals, Box-Muller on the two 32-bit halves of each word."""
    bits_ck = _stream_bits(seed, purpose, ids_c, count)
    u1_ck = ((bits_ck >> np.uint64(32)).astype(np.float64) + 1.0) * 2.0 ** -32   # (0, 1]
    u2_ck = (bits_ck & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32    # [0, 1)
    return (np.sqrt(-2.0 * np.log(u1_ck)) * np.cos(2.0 * np.pi * u2_ck)).astype(np.float32)


def _unit_rows(x_cL: np.ndarray) -> np.ndarray:
    return x_cL / np.linalg.norm(x_cL, axis=1, keepdims=True)


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float32 (out_size, in_size): bilinear interpolation with aligned pixel centres."""
    pos_o = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo_o = np.floor(pos_o).astype(int)
    hi_o = np.minimum(lo_o + 1, in_size - 1)
    frac_o = pos_o - lo_o
    interp_oi = np.zeros((out_size, in_size), np.float32)
    np.add.at(interp_oi, (np.arange(out_size), lo_o), 1 - frac_o)
    np.add.at(interp_oi, (np.arange(out_size), hi_o), frac_o)
    return interp_oi


class SyntheticGenerator:
    """Samples of synthetic classes as a pure function of (params, class id, split, index)."""

    def __init__(self, params: SyntheticParams) -> None:
        self.params = params
        latent, dim, f32 = params.latent_dim, params.dim, np.float32
        # The fixed nonlinear map: its weights depend on the seed (and the dims) alone. Gains:
        # 1.5 puts tanh in its nonlinear range; tanh outputs have std ~0.3, so the factor 3
        # brings the vectors to about unit scale, and 1.5 spreads sigmoid over 0..1.
        rng = np.random.default_rng([params.seed, 0x5EED])
        self.w1_LH = (rng.standard_normal((latent, HIDDEN_DIM)) * 1.5 / latent ** 0.5).astype(f32)
        self.b1_H = (0.1 * rng.standard_normal(HIDDEN_DIM)).astype(f32)
        self.w2_Hd = (rng.standard_normal((HIDDEN_DIM, dim)) * 3.0 / HIDDEN_DIM ** 0.5).astype(f32)
        if params.kind == "images":
            self.render_dP = (rng.standard_normal((dim, LOW_RES * LOW_RES * 3))
                              * 1.5 / dim ** 0.5).astype(f32)
            self.upsample_SR = _bilinear_matrix(params.image_size, LOW_RES)

    def class_centres(self, ids_c: np.ndarray) -> np.ndarray:
        """float32 (c, L) latent class centres."""
        seed, latent = self.params.seed, self.params.latent_dim
        families_c = ids_c // self.params.family_size
        family_cL = _unit_rows(_stream_normals(seed, _FAMILY, families_c, latent))
        offset_cL = _unit_rows(_stream_normals(seed, _CLASS, ids_c, latent))
        return family_cL + CLASS_SPREAD * offset_cL

    def samples(self, ids_c: np.ndarray, split: str,
                per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples 0..per_class-1 of each class of `split`, class-major:
        (inputs (m, *input_shape) float32 or uint8, labels (m,) int64), m = c * per_class."""
        ids_c = np.asarray(ids_c, dtype=np.int64)
        latent = self.params.latent_dim
        noise_ck = _stream_normals(self.params.seed, _NOISE + _SPLIT_CODE[split], ids_c,
                                   per_class * latent)
        z_cnL = (self.class_centres(ids_c)[:, None, :]
                 + NOISE_STD * noise_ck.reshape(len(ids_c), per_class, latent))
        vector_md = np.tanh(z_cnL.reshape(-1, latent) @ self.w1_LH + self.b1_H) @ self.w2_Hd
        labels_m = np.repeat(ids_c, per_class)
        if self.params.kind == "vectors":
            return vector_md, labels_m
        return self._render(vector_md, ids_c, split, per_class), labels_m

    def _render(self, vector_md: np.ndarray, ids_c: np.ndarray, split: str,
                per_class: int) -> np.ndarray:
        """uint8 (m, S, S, C) images of the vectors."""
        size = self.params.image_size
        low_mRRC = 1.0 / (1.0 + np.exp(-(vector_md @ self.render_dP)))
        low_mRRC = low_mRRC.reshape(-1, LOW_RES, LOW_RES, 3)
        image_mSSC = np.einsum("sr,mrqc,tq->mstc", self.upsample_SR, low_mRRC, self.upsample_SR,
                               optimize=True) * 255.0
        # Uniform pixel noise: 8 bytes per stream word, a class's images take consecutive words.
        words = -(-size * size * 3 // 8)
        bits_ck = _stream_bits(self.params.seed, _PIXELS + _SPLIT_CODE[split], ids_c,
                               per_class * words)
        bytes_mB = bits_ck.reshape(-1, words).view(np.uint8)[:, :size * size * 3]
        noise_mSSC = (bytes_mB.astype(np.float32) - 127.5).reshape(image_mSSC.shape)
        image_mSSC += noise_mSSC * (PIXEL_NOISE / 127.5)
        return np.clip(np.rint(image_mSSC), 0, 255).astype(np.uint8)


def generate(out_dir: str | Path, params: SyntheticParams, num_classes: int,
             shard_size: int | None = None, overwrite: bool = False, progress: bool = True,
             grown_from: str | None = None,
             lineage: tuple[Ancestor, ...] = ()) -> DatasetInfo:
    """Writes classes 0..num_classes-1 of `params` as a dataset; returns its DatasetInfo.

    Classes are processed in chunks of `params.chunk_classes` ids (vectorised over classes and
    samples); the train split holds each class's samples contiguously, in class order.
    `grown_from` (a path, generator metadata) and `lineage` (dataset.json's, see
    data_prep/lineage.py) record the version it was grown from.
    """
    from tqdm import tqdm

    generator = SyntheticGenerator(params)
    metadata = {"name": GENERATOR_NAME, "version": GENERATOR_VERSION, **asdict(params),
                "latent_dim": params.latent_dim, "grown_from": grown_from}
    chunk = params.chunk_classes
    with DatasetWriter(out_dir, params.kind, params.input_shape, num_classes, class_key,
                       shard_size=shard_size, generator=metadata, overwrite=overwrite,
                       lineage=lineage) as writer, \
            tqdm(total=num_classes, unit="class", file=sys.stderr, disable=not progress,
                 desc="synthetic") as bar:
        for start in range(0, num_classes, chunk):
            ids_c = np.arange(start, start + chunk)     # full chunk, see the module docstring
            keep = min(chunk, num_classes - start)
            for split, per_class in (("train", params.per_class), ("val", params.val_per_class)):
                if per_class:
                    inputs_m, labels_m = generator.samples(ids_c, split, per_class)
                    writer.write(split, inputs_m[:keep * per_class], labels_m[:keep * per_class])
            bar.update(keep)
    return writer.dataset_info


def _params_to_grow(old_dir: str, args: argparse.Namespace) -> tuple[SyntheticParams, int]:
    """The parameters of the synthetic dataset in `old_dir` (and its class count); a flag given
    on the command line must agree with them."""
    info = load_dataset_info(old_dir)
    path = Path(old_dir) / "dataset.json"
    gen = info.generator
    if gen.get("name") != GENERATOR_NAME or gen.get("version") != GENERATOR_VERSION:
        raise DatasetError(path, f"was not written by {GENERATOR_NAME} version "
                           f"{GENERATOR_VERSION} (generator {gen.get('name')!r} version "
                           f"{gen.get('version')!r})",
                           "grow only synthetic datasets of this version")
    fields = {name: gen.get(name) for name in SyntheticParams.__dataclass_fields__}
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    given_classes = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    for name, value in {**given, **given_classes}.items():
        old = info.num_classes if name == "num_classes" else fields[name]
        if value != old:
            flag = "--" + name.replace("_", "-")
            raise DatasetError(path, f"{flag} {value} disagrees with the dataset to grow "
                               f"({name} = {old})", f"drop {flag} to keep the old value")
    try:
        return SyntheticParams(**fields), info.num_classes
    except (TypeError, ValueError) as err:
        raise DatasetError(path, f"generator metadata is invalid ({err})",
                           "regenerate the dataset to grow") from err


def _params_from_flags(args: argparse.Namespace,
                       parser: argparse.ArgumentParser) -> SyntheticParams:
    """SyntheticParams from the flags given, defaults for the others; a usage error if invalid."""
    defaults = SyntheticParams()
    values = {name: getattr(args, name) for name in SyntheticParams.__dataclass_fields__}
    try:
        return SyntheticParams(**{name: getattr(defaults, name) if value is None else value
                                  for name, value in values.items()})
    except ValueError as err:
        parser.error(str(err))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Write a synthetic classification dataset (HDF5 shards, docs/design.md, "
                    "'Contracts: Dataset directory') with classes in families of confusable "
                    "classes. With --grow-from, regenerate an existing synthetic dataset's "
                    "classes (same ids, keys and samples) and append --new-classes classes; the "
                    "generator flags default to the old dataset's.")
    unless = "required unless --grow-from"
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--num-classes", type=int,
                        help=f"number of classes C ({unless}; with it, if given, the old C)")
    parser.add_argument("--per-class", type=int, help=f"train samples per class ({unless})")
    parser.add_argument("--val-per-class", type=int, help=f"val samples per class ({unless})")
    parser.add_argument("--dim", type=int, help="vector dimension d; for images, the dimension "
                        f"of the vector each image is rendered from ({unless})")
    parser.add_argument("--kind", choices=("vectors", "images"), help="default: vectors")
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument("--family-size", type=int,
                        help="confusable classes per family (default: 16)")
    parser.add_argument("--image-size", type=int, help="image height and width for --kind "
                        f"images (default: 32, at least {LOW_RES})")
    parser.add_argument("--grow-from", metavar="DIR",
                        help="synthetic dataset whose classes to keep")
    parser.add_argument("--new-classes", type=int, help="classes to append with --grow-from")
    parser.add_argument("--shard-size", type=int,
                        help="samples per shard (default: about 64 MiB of inputs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset that already exists in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.grow_from is None) != (args.new_classes is None):
        parser.error("--grow-from and --new-classes go together")
    if args.grow_from is not None:
        if args.new_classes < 1:
            parser.error(f"--new-classes must be >= 1, got {args.new_classes}")
        if Path(args.grow_from).resolve() == Path(args.out).resolve():
            parser.error("--out must differ from --grow-from (the old dataset is kept)")
    else:
        missing = [flag for flag in ("num_classes", "per_class", "val_per_class", "dim")
                   if getattr(args, flag) is None]
        if missing:
            parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
        if args.num_classes < 1:
            parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.shard_size is not None and args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    start = time.perf_counter()
    try:
        lineage = ()
        if args.grow_from is not None:
            params, old_classes = _params_to_grow(args.grow_from, args)
            num_classes = old_classes + args.new_classes
            lineage = child_lineage(args.grow_from)
        else:
            params, num_classes = _params_from_flags(args, parser), args.num_classes
        info = generate(args.out, params, num_classes, shard_size=args.shard_size,
                        overwrite=args.overwrite, grown_from=args.grow_from, lineage=lineage)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, val = info.splits["train"], info.splits["val"]
    size = sum((Path(args.out) / s.path).stat().st_size for sp in (train, val) for s in sp.shards)
    print(f"wrote {args.out}: {params.kind} {list(params.input_shape)} {info.input_dtype}, "
          f"{num_classes} classes in families of {params.family_size}, "
          f"train {train.num_samples} / val {val.num_samples} samples in "
          f"{len(train.shards)} + {len(val.shards)} shards, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
