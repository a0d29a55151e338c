"""APCodec as a codec: audio to codes and back, codes files, any input rate and channel count, long files.

    codec = Codec.load(h, encoder_path, decoder_path)
    codes = codec.encode(audio, sample_rate)        # audio (C, L) or (L,) -> CodesFile
    codes.save("speech.apc")
    audio, rate = codec.decode(CodesFile.load("speech.apc"))

The model knows nothing of files or rates; this module adds, around the fast forward
(`fastpath.FastGenerator`, or `codec_roundtrip` for a causal codec):

* resampling to the model's rate and back to the input's (soxr, as librosa uses it);
* channels coded separately (each is one batch item) and restored in order;
* long inputs cut into overlapping windows whose outputs are crossfaded, so that memory
  stays bounded: files are read, coded and written window by window;
* `CodesFile`, a small container for codes with what decoding needs, bit-packed.
"""
import hashlib
import math
import numbers
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
import torch
from tqdm import tqdm

from checkpoints import load_generator
from config import AttrDict
from dataset import sound_file
from fastpath import CHUNK_FRAMES, FastGenerator, check_precision, resolve_precision
from models import Decoder, Encoder, remove_weight_norm
from spectral import amp_pha_spectrum, analysis_frames, pad_for_analysis
from streaming import causal_analysis, causal_decode, require_causal, stream_roundtrip
from streaming import causal_latent_frames
from utils import atomic_write, pick_device

CODES_EXTENSION = ".apc"
# Windows overlap by this long; the crossfade is its middle half, so that every output
# sample comes from at least a quarter overlap away from its window's edges (the network's
# receptive field is about 0.11 s at the default settings).
OVERLAP_SECONDS = 1.0
CHUNK_SECONDS = 30.0        # default window stride of long inputs
BATCH_SECONDS = 600.0       # padded audio per batch of short files (one forward pass on a GPU)
STREAM_CHUNK_MS = 10.0      # default chunk of a stream
MAX_CHUNK_MS = 60000.0
BLOCK_SAMPLES = 1 << 16     # file read size
# What coding one file can raise that fails that file alone (unreadable, bad content, out of
# memory), so that the others go on.
FILE_ERRORS = (OSError, ValueError, RuntimeError)
Audio = Union[np.ndarray, torch.Tensor]


def load_codec(h: AttrDict, encoder_path: Optional[str], decoder_path: Optional[str], device: torch.device
               ) -> Tuple[Encoder, Decoder, AttrDict]:
    """Encoder and decoder for inference (eval mode, weight norm folded), and the config that
    matches their weights (see `checkpoints.load_generator`); a path left None is the config's
    (checkpoint_file_load_Encoder / _Decoder), named if its file is missing.

    The decoder carries `checkpoint_hash`, the hash of the decoding weights as stored (weight
    norm's g and v), which codes files record: the folded weights' last bits depend on the
    kernels that fold them, so their hash could differ between machines.
    """
    paths = []
    for key, path in (("checkpoint_file_load_Encoder", encoder_path), ("checkpoint_file_load_Decoder", decoder_path)):
        if path is None:
            path = h[key]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config key '{key}': checkpoint not found: {path}")
        paths.append(path)
    encoder, decoder, h = load_generator(h, *paths, device)
    checkpoint_hash = decoding_weights_hash(encoder, decoder)
    encoder, decoder = remove_weight_norm(encoder).eval(), remove_weight_norm(decoder).eval()
    decoder.checkpoint_hash = checkpoint_hash
    return encoder, decoder, h


def decoding_weights_hash(encoder: Encoder, decoder: Decoder) -> bytes:
    """First 16 bytes of the SHA-256 of what decoding uses, the quantizer (codes -> latent) and
    the decoder, as their state dicts hold them."""
    digest = hashlib.sha256()
    for module in (encoder.quantizer, decoder):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.digest()[:16]


def _analysis(audio: torch.Tensor, h: AttrDict) -> Tuple[torch.Tensor, torch.Tensor]:
    """The encoder's inputs for audio (B, L): log amplitude and phase (B, F, T) of the padded signal."""
    logamp, pha, _, _ = amp_pha_spectrum(pad_for_analysis(audio, h.n_fft, h.hop_size),
                                         h.n_fft, h.hop_size, h.win_size)
    return logamp, pha


@torch.no_grad()
def codec_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h: AttrDict,
                    n_codebooks: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Encode and decode audio (B, L), any L >= 1, with the first `n_codebooks` stages (all by default).

    Returns codes (B, n, T'), the decoder's predicted real/imag spectra (B, F, ratio*T')
    and audio (B, L). The input is zero-padded for the analysis (to whole hops, and to
    n_fft / 2 for very short clips), run through the release's modules and the output
    trimmed back to L: the release's own output when L is a whole number of hops and the
    frame count a multiple of `ratio`. A causal codec analyses the audio as a stream sees it
    (`streaming.causal_analysis`), so that this is what a stream gives.
    """
    analysis = causal_analysis if h.causal else _analysis
    quantized = encoder(*analysis(audio, h), n_codebooks)
    out = decoder(quantized.latent)
    return {"codes": quantized.codes, "real": out.real, "imag": out.imag,
            "audio": out.audio.squeeze(1)[:, :audio.size(-1)]}


def latent_frames(length: int, h: AttrDict) -> int:
    """Latent frames T' that `codec_roundtrip` gives for `length` samples."""
    if h.causal:
        return causal_latent_frames(length, h)
    return -(-analysis_frames(length, h.n_fft, h.hop_size) // h.ratio)


# ---------------------------------------------------------------------------------------
# Codes files
# ---------------------------------------------------------------------------------------

MAGIC = b"APCD"
FORMAT_VERSION = 2
# (field, struct code, meaning): the header, little-endian, in file order. docs/inference.md documents it.
HEADER_FIELDS = (
    ("magic", "4s", "b'APCD'"),
    ("version", "H", "format version (2)"),
    ("sampling_rate", "I", "model sampling rate, Hz"),
    ("n_fft", "I", "STFT size"),
    ("hop_size", "I", "STFT hop, samples"),
    ("win_size", "I", "STFT window, samples"),
    ("ratio", "I", "STFT frames per latent frame"),
    ("causal", "H", "1: the causal codec (APCodec-S), 0: the paper's"),
    ("codebook_size", "I", "codes per codebook"),
    ("n_codebooks", "H", "codebooks used (1 ... the model's)"),
    ("channels", "H", "channels, each coded separately"),
    ("original_sample_rate", "I", "input sampling rate, Hz"),
    ("original_length", "Q", "input length, samples per channel at the input rate"),
    ("model_length", "Q", "length at the model rate"),
    ("frames", "Q", "latent frames per channel and codebook (all windows)"),
    ("chunk_length", "Q", "window stride at the model rate, samples; 0 = one window"),
    ("chunk_overlap", "Q", "window overlap, samples"),
    ("model_hash", "16s", "first 16 bytes of the SHA-256 of the decoding weights as stored (weight norm "
                          "not folded)"),
    ("crc32", "I", "CRC-32 of the header before this field and of the codes"),
)
# Version 1 files lack these: weights of either fit the same network, so only the header
# can tell which one decodes a file. Version 1 files are still read, without that check.
ADDED_IN_VERSION_2 = ("win_size", "causal")
# version -> (its header's field names, its struct)
_LAYOUTS = {version: ([name for name, _ in fields], struct.Struct("<" + "".join(code for _, code in fields)))
            for version, fields in (
                (1, [(name, code) for name, code, _ in HEADER_FIELDS if name not in ADDED_IN_VERSION_2]),
                (2, [(name, code) for name, code, _ in HEADER_FIELDS]))}
# Header fields that are not CodesFile attributes: constants, the codes' shape and the checksum.
_DERIVED = ("magic", "version", "n_codebooks", "channels", "frames", "crc32")


def chunk_samples(chunk_ms: float, sampling_rate: int, option: str = "--chunk_ms") -> int:
    """A stream's chunk of `chunk_ms` milliseconds in samples (at least one); a one-line error
    naming `option` unless it is a positive number of at most MAX_CHUNK_MS (a larger chunk
    is not a stream, and is read into memory whole)."""
    if not (math.isfinite(chunk_ms) and 0 < chunk_ms <= MAX_CHUNK_MS):
        raise ValueError(f"{option} must be a positive number of at most {MAX_CHUNK_MS:g} (a minute), "
                         f"got {chunk_ms:g}")
    return max(1, round(chunk_ms * sampling_rate / 1000))


def check_n_codebooks(n_codebooks: Optional[int], total: int) -> int:
    """How many of a model's `total` codebooks to code with: `n_codebooks` (all when None), or
    a one-line error naming --n_codebooks."""
    if n_codebooks is None:
        return total
    if isinstance(n_codebooks, bool) or not isinstance(n_codebooks, numbers.Integral) or not 1 <= n_codebooks <= total:
        raise ValueError(f"--n_codebooks must be a whole number in 1 ... {total} (the model's codebooks), "
                         f"got {n_codebooks}")
    return n_codebooks


def code_bits(codebook_size: int) -> int:
    """Bits per code: ceil(log2(codebook_size))."""
    return max(1, math.ceil(math.log2(codebook_size)))


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2**bits, most significant bit first, packed into bytes (zero-padded)."""
    values = codes.reshape(-1).astype(np.uint32)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((values[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first `count` values, int64."""
    bit_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits).reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return bit_array.astype(np.int64) @ weights


@dataclass
class CodesFile:
    """Codes of one input, with what decoding needs.

    `codes`: int64 (channels, n_codebooks, frames). Windows of a long input are stored one
    after another along the frame axis; `Codec.windows(model_length)` finds them again.
    `win_size` and `causal` are None for a file of format version 1, which did not record them.
    """
    codes: torch.Tensor
    sampling_rate: int
    n_fft: int
    hop_size: int
    ratio: int
    codebook_size: int
    model_hash: bytes
    original_sample_rate: int
    original_length: int
    model_length: int
    chunk_length: int = 0
    chunk_overlap: int = 0
    name: str = "<codes>"
    win_size: Optional[int] = None
    causal: Optional[bool] = None

    @property
    def channels(self) -> int:
        """Channels of the coded audio, each coded on its own."""
        return self.codes.size(0)

    @property
    def n_codebooks(self) -> int:
        return self.codes.size(1)

    def to_bytes(self) -> bytes:
        """The file's bytes: header, then the codes packed in whole bits each (format version 1
        for a version 1 file read back, which cannot tell its win_size and causal)."""
        payload = pack_codes(self.codes.cpu().numpy(), code_bits(self.codebook_size))
        version = 1 if self.win_size is None or self.causal is None else FORMAT_VERSION
        names, layout = _LAYOUTS[version]
        fields = dict(magic=MAGIC, version=version, n_codebooks=self.n_codebooks, channels=self.channels,
                      frames=self.codes.size(2), crc32=0,
                      **{name: getattr(self, name) for name in names if name not in _DERIVED})
        header = layout.pack(*(fields[name] for name in names))
        crc = zlib.crc32(payload, zlib.crc32(header[:-4]))
        return header[:-4] + struct.pack("<I", crc) + payload

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<codes>") -> "CodesFile":
        """Parse and check a codes file; a foreign, truncated or corrupted one is a ValueError naming `name`."""
        def fail(problem: str) -> NoReturn:
            raise ValueError(f"{name}: {problem}")

        if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
            fail("not an APCodec codes file (no APCD magic bytes)")
        version = struct.unpack_from("<H", data, len(MAGIC))[0] if len(data) >= len(MAGIC) + 2 else None
        if version is not None and version not in _LAYOUTS:
            fail(f"codes file format version {version}, this program reads versions "
                 f"{', '.join(map(str, _LAYOUTS))}")
        names, layout = _LAYOUTS[version or FORMAT_VERSION]
        if len(data) < layout.size:
            fail(f"truncated codes file ({len(data)} bytes, the header alone is {layout.size})")
        fields = dict(zip(names, layout.unpack_from(data)))
        count = fields["channels"] * fields["n_codebooks"] * fields["frames"]
        bits = code_bits(max(fields["codebook_size"], 1))
        expected = layout.size + -(-count * bits // 8)
        if len(data) < expected:
            # A header whose counts were corrupted reads as a cut-off file too.
            fail(f"truncated or corrupted codes file ({len(data)} of the {expected} bytes its header gives)")
        checksum = zlib.crc32(data[layout.size:], zlib.crc32(data[:layout.size - 4]))
        if len(data) > expected or checksum != fields["crc32"]:
            fail("corrupted codes file (checksum mismatch)")
        codes = unpack_codes(data[layout.size:], bits, count)
        if count and codes.max() >= fields["codebook_size"]:
            fail("corrupted codes file (code out of range)")
        codes = torch.from_numpy(codes).reshape(fields["channels"], fields["n_codebooks"], fields["frames"])
        if "causal" in fields:
            fields["causal"] = bool(fields["causal"])
        return cls(codes=codes, name=name, **{n: fields[n] for n in names if n not in _DERIVED})

    def save(self, path: str) -> None:
        """Write atomically: a crash never leaves half a codes file."""
        data = self.to_bytes()
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str) -> "CodesFile":
        """Read a codes file; a one-line ValueError naming it if it cannot be read or is not one."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read codes file {path}: {e.strerror}") from None
        return cls.from_bytes(data, path)

    def seconds(self) -> float:
        """Duration of the coded audio."""
        return self.original_length / self.original_sample_rate


# ---------------------------------------------------------------------------------------
# Streams of audio blocks (n, channels) float32
# ---------------------------------------------------------------------------------------

def _exact_length(blocks: Iterable[np.ndarray], length: int, channels: int) -> Iterator[np.ndarray]:
    """The blocks cut or zero-padded at the end to `length` samples in all."""
    done = 0
    for block in blocks:
        block = block[:length - done]
        done += len(block)
        if len(block):
            yield block
    if done < length:
        yield np.zeros((length - done, channels), np.float32)


def _resampled(blocks: Iterable[np.ndarray], from_rate: int, to_rate: int, channels: int,
               length: int) -> Iterator[np.ndarray]:
    """The blocks resampled as one stream (soxr HQ, as librosa's default), `length` samples in all."""
    if from_rate == to_rate:
        return _exact_length(blocks, length, channels)

    def stream() -> Iterator[np.ndarray]:
        resampler = soxr.ResampleStream(from_rate, to_rate, channels, dtype="float32", quality="HQ")
        for block in blocks:
            yield resampler.resample_chunk(block)
        yield resampler.resample_chunk(np.zeros((0, channels), np.float32), last=True)
    return _exact_length(stream(), length, channels)


def resampled_length(length: int, from_rate: int, to_rate: int) -> int:
    """Samples that `length` samples at `from_rate` last at `to_rate`, rounded up."""
    return -(-length * to_rate // from_rate)


def window_spans(length: int, stride: int, overlap: int) -> List[Tuple[int, int]]:
    """(start, length) of the windows of `length` samples: one window when it fits in
    stride + overlap, else windows of stride + overlap every `stride` samples, the last shorter."""
    if not stride or length <= stride + overlap:
        return [(0, length)]
    return [(k * stride, min(stride + overlap, length - k * stride)) for k in range(-(-(length - overlap) // stride))]


def _cut(blocks: Iterable[np.ndarray], windows: List[Tuple[int, int]]) -> Iterator[np.ndarray]:
    """The windows (start, length) of a stream of blocks, each (length, channels), in order.

    Only the current window is held in memory.
    """
    blocks = iter(blocks)
    pending: List[np.ndarray] = []
    offset = held = 0          # stream position of the held samples' start; samples held
    for i, (start, length) in enumerate(windows):
        while offset + held < start + length:
            pending.append(next(blocks))
            held += len(pending[-1])
        joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
        yield joined[start - offset:start - offset + length]
        drop = (windows[i + 1][0] if i + 1 < len(windows) else start + length) - offset
        pending, offset, held = [joined[drop:]], offset + drop, held - drop


def _crossfade(outputs: Iterable[np.ndarray], overlap: int) -> Iterator[np.ndarray]:
    """Join window outputs (length, channels) that overlap by `overlap` samples into one stream.

    Inside each overlap the first quarter comes from the earlier window, the middle half is
    a raised-cosine crossfade and the last quarter comes from the later window.
    """
    quarter = overlap // 4
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap - 2 * quarter) + 0.5) / (overlap - 2 * quarter))
    fade = np.concatenate([np.zeros(quarter), ramp, np.ones(quarter)]).astype(np.float32)[:, None]
    tail = None
    for out in outputs:
        if tail is not None:
            out = np.concatenate([tail * (1 - fade) + out[:overlap] * fade, out[overlap:]])
        yield out[:len(out) - overlap]
        tail = out[len(out) - overlap:]
    if tail is not None and len(tail):
        yield tail


def _finite(block: np.ndarray, source: str) -> np.ndarray:
    """The block, or a one-line ValueError naming `source` when it holds NaN or infinite samples
    (floating-point audio can; one would turn the whole output to noise)."""
    if not np.isfinite(block).all():
        raise ValueError(f"{source} has NaN or infinite samples")
    return block


# More channels than this, and than samples, is taken for the (samples, channels) layout.
MAX_CHANNELS = 64


def _blocks_of(audio: Audio, sample_rate: float) -> Tuple[List[np.ndarray], int, int, int]:
    """In-memory audio (L,) or (C, L) as one block (L, C) float32, its rate, channels and length.

    One-line errors for what would otherwise code silently wrong: integer samples (PCM
    whose scale is not [-1, 1]) and soundfile's (L, C) layout (more than MAX_CHANNELS
    channels, and more channels than samples)."""
    audio = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be floating point in [-1, 1], got {audio.dtype} samples (e.g. read files "
                         f"with soundfile.read(path, dtype='float32'), or divide 16-bit PCM by 32768)")
    audio = np.atleast_2d(audio).astype(np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (samples,) or (channels, samples), got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("no samples to code")
    if audio.shape[0] > max(audio.shape[1], MAX_CHANNELS):
        raise ValueError(f"audio of shape {audio.shape} would be {audio.shape[0]} channels of {audio.shape[1]} "
                         f"samples: pass (channels, samples), e.g. the transpose of soundfile's (samples, channels)")
    # A codes file records the rate in 32 bits.
    if isinstance(sample_rate, bool) or not (isinstance(sample_rate, (int, float, np.number))
                                             and 0 < sample_rate < 2 ** 32 and float(sample_rate).is_integer()):
        raise ValueError(f"sample_rate must be a positive whole number of Hz below 2**32, got {sample_rate!r}")
    return [np.ascontiguousarray(_finite(audio, "the audio").T)], int(sample_rate), audio.shape[0], audio.shape[1]


def _file_blocks(path: str) -> Tuple[Iterator[np.ndarray], int, int, int]:
    """A file's blocks (n, channels) float32, read lazily, with its rate, channels and length."""
    try:
        info = sf.info(sound_file(path))
    except Exception as e:
        raise ValueError(f"cannot read audio file {path}: {e}") from None
    if info.frames < 1:
        raise ValueError(f"audio file {path} holds no samples")

    def blocks() -> Iterator[np.ndarray]:
        with sf.SoundFile(sound_file(path)) as f:
            for block in f.blocks(blocksize=BLOCK_SAMPLES, dtype="float32", always_2d=True):
                yield _finite(block, f"audio file {path}")
    return blocks(), info.samplerate, info.channels, info.frames


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples (any shape) as 16-bit PCM, rounded to the nearest step and clipped; read
    back as int / 32768. libsndfile's own conversion rounds down: half a step low on average."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: str, blocks: Iterable[np.ndarray], rate: int, channels: int) -> None:
    """A 16-bit PCM wav of float `blocks` ((n,) or (n, channels) each) written block by block,
    atomically."""
    def write(f: BinaryIO) -> None:
        with sf.SoundFile(f, "w", rate, channels, subtype="PCM_16", format="WAV") as out:
            for block in blocks:
                out.write(pcm16(block))
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------

class Codec:
    """A trained APCodec as an audio codec: any rate, any channel count, any length.

    Inputs up to `chunk_seconds` (+ the overlap) are coded in one window, which gives
    `codec_roundtrip`'s output (to float rounding); longer ones in windows of `chunk_seconds`
    that overlap by `OVERLAP_SECONDS` and are crossfaded. With `file_statistics` the encoder's
    GRN layers of every window pool over (nearly) the whole input's statistics: one more pass
    over the encoder first, so that codes match one pass's but for rare near-ties (see
    `_statistics` and `FastGenerator.encoder_statistics`).

    The paper's codec runs `fastpath.FastGenerator` in `precision` ("float32": the reference
    numbers; "bfloat16" or "int8": faster, approximate; "auto": the faster of those two on
    this machine). A causal one runs `codec_roundtrip`, or with `stream_ms` the streaming
    codec in chunks of that many milliseconds, in `precision`. `compile` runs the fast path's
    ConvNeXt blocks through torch.compile (see `FastGenerator`).
    """

    def __init__(self, h: AttrDict, encoder: Encoder, decoder: Decoder, device: torch.device,
                 chunk_seconds: float = CHUNK_SECONDS, precision: str = "float32",
                 stream_ms: Optional[float] = None, file_statistics: bool = False, compile: bool = False):
        if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
            raise ValueError(f"--chunk_seconds must be a positive number, got {chunk_seconds}")
        self.h, self.encoder, self.decoder, self.device = h, encoder, decoder, device
        self.file_statistics = file_statistics
        if h.causal and precision != "float32" and stream_ms is None:
            raise ValueError("--precision applies to a causal codec only with --stream; its offline pass runs "
                             "in float32")
        if compile and h.causal:
            raise ValueError("--compile applies to the paper's codec, whose offline pass runs the fast path; a "
                             "causal codec's does not")
        if h.causal and file_statistics:
            raise ValueError("--file_statistics applies to the paper's codec; a causal codec's GRN pools over "
                             "one frame")
        self.precision = resolve_precision(precision, device)
        check_precision(self.precision, device)
        if compile and self.precision == "int8" and precision == "auto":
            raise ValueError("--compile runs float32 and bfloat16, and --precision auto chose int8 on this CPU: "
                             "give --precision bfloat16, or leave out --compile")
        # On a GPU a batch of clips runs at once; on the CPU one clip at a time, in cache-sized chunks.
        self.fast = None if h.causal else FastGenerator(encoder, decoder, h, self.precision,
                                                        None if device.type == "cuda" else CHUNK_FRAMES, compile)
        self.stream_chunk: Optional[int] = None if stream_ms is None else self._stream_chunk(stream_ms)
        frame = h.hop_size * h.ratio   # windows start on latent frames, as the whole-file analysis does
        self.chunk_length = max(1, round(chunk_seconds * h.sampling_rate / frame)) * frame
        self.chunk_overlap = max(1, round(OVERLAP_SECONDS * h.sampling_rate / frame)) * frame
        # Codes files record `model_hash` and decode where it matches: the checkpoint's (see
        # `load_codec`), else that of the weights as given. Files of earlier versions hold the
        # folded weights' hash.
        folded = decoding_weights_hash(encoder, decoder)
        self.model_hash = getattr(decoder, "checkpoint_hash", folded)
        self.accepted_hashes = {self.model_hash, folded}

    @classmethod
    def load(cls, h: AttrDict, encoder_path: Optional[str] = None, decoder_path: Optional[str] = None,
             device: Optional[torch.device] = None, chunk_seconds: float = CHUNK_SECONDS,
             precision: str = "float32", stream_ms: Optional[float] = None, file_statistics: bool = False,
             compile: bool = False) -> "Codec":
        """A codec from release-format checkpoints (default: the config's inference checkpoints)."""
        device = device or pick_device()
        encoder, decoder, h = load_codec(h, encoder_path, decoder_path, device)
        return cls(h, encoder, decoder, device, chunk_seconds, precision, stream_ms, file_statistics, compile)

    def roundtrip(self, audio: torch.Tensor, n_codebooks: Optional[int],
                  statistics: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Resynthesis of one window's channels, (C, L) -> (C, L): the fast path, or for a causal
        codec its offline pass or (`stream_ms`) the streaming codec; `statistics` as in `_statistics`."""
        if self.stream_chunk is not None:
            if n_codebooks not in (None, self.h.n_codebooks):
                raise ValueError("--stream resynthesises with every codebook; n_codebooks applies to the "
                                 "offline pass")
            return stream_roundtrip(self.encoder, self.decoder, audio, self.h, self.stream_chunk,
                                    self.precision)["audio"]
        if self.fast is None:
            return codec_roundtrip(self.encoder, self.decoder, audio, self.h, n_codebooks)["audio"]
        return torch.stack([out["audio"] for out in self.fast.roundtrip(list(audio), n_codebooks, statistics)])

    def _statistics(self, blocks: Iterable[np.ndarray], rate: int, channels: int, model_length: int,
                    windows: List[Tuple[int, int]]) -> Optional[List[torch.Tensor]]:
        """The encoder's GRN statistics over the whole input, from one pass over its windows, when
        `file_statistics` is set and the input has several windows; else None (each window's own)."""
        if not (self.file_statistics and self.fast is not None and len(windows) > 1):
            return None
        half = self.chunk_overlap // 2
        total: List[torch.Tensor] = []
        with torch.no_grad():
            for k, audio in enumerate(self._window_audio(blocks, rate, channels, model_length, windows, "statistics")):
                # Each window counts the frames up to the middle of its overlaps, as the crossfade joins them.
                last = k == len(windows) - 1
                owned = (half if k else 0, audio.size(-1) + self.h.n_fft if last else self.chunk_length + half)
                sums = self.fast.encoder_statistics(list(audio), owned)
                total = sums if not total else [a + b for a, b in zip(total, sums)]
        return total

    def _stream_chunk(self, chunk_ms: float) -> int:
        """The streaming codec's chunk in samples, for resynthesis in chunks of `chunk_ms`
        milliseconds (causal codecs; in float32 the output equals the offline pass up to float
        rounding)."""
        chunk = chunk_samples(chunk_ms, self.h.sampling_rate)
        require_causal(self.h, what="--stream")
        return chunk

    def _window_audio(self, blocks: Iterable[np.ndarray], rate: int, channels: int, model_length: int,
                      windows: List[Tuple[int, int]], what: str) -> Iterator[torch.Tensor]:
        """Each window of an input read as `blocks` (length, channels) at `rate`: the codec's
        input (C, L) at the model's rate on its device, with a progress bar labelled `what`."""
        cut = _cut(_resampled(blocks, rate, self.h.sampling_rate, channels, model_length), windows)
        for window in self._progress(cut, len(windows), what):
            yield torch.from_numpy(np.ascontiguousarray(window.T)).to(self.device)

    def windows(self, length: int) -> List[Tuple[int, int]]:
        """(start, length) of the windows of an input of `length` samples at the model rate."""
        return window_spans(length, self.chunk_length, self.chunk_overlap)

    def _chunking(self, windows: List[Tuple[int, int]]) -> Tuple[int, int]:
        """(chunk_length, chunk_overlap) as a codes file records them; (0, 0) for one window."""
        return (self.chunk_length, self.chunk_overlap) if len(windows) > 1 else (0, 0)

    @staticmethod
    def _progress(items: Iterable, count: int, what: str) -> Iterable:
        return tqdm(items, total=count, desc=what, unit="chunk", leave=False, disable=count == 1)

    # -- encoding ----------------------------------------------------------------------

    @torch.no_grad()
    def _encode_stream(self, reader: Callable[[], Iterable[np.ndarray]], rate: int, channels: int, length: int,
                       n_codebooks: Optional[int] = None) -> CodesFile:
        h = self.h
        n_codebooks = self.check_n_codebooks(n_codebooks)
        model_length = resampled_length(length, rate, h.sampling_rate)
        windows = self.windows(model_length)
        statistics = self._statistics(reader(), rate, channels, model_length, windows)
        codes = [self._encode_window(audio, n_codebooks, statistics).cpu()
                 for audio in self._window_audio(reader(), rate, channels, model_length, windows, "encoding")]
        chunk_length, chunk_overlap = self._chunking(windows)
        return CodesFile(torch.cat(codes, dim=-1), h.sampling_rate, h.n_fft, h.hop_size, h.ratio, h.codebook_size,
                         self.model_hash, rate, length, model_length, chunk_length, chunk_overlap,
                         win_size=h.win_size, causal=h.causal)

    def _encode_window(self, audio: torch.Tensor, n_codebooks: int,
                       statistics: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """One window's channels (C, L) -> codes (C, n_codebooks, T'); `statistics` as in `_statistics`."""
        if self.h.causal:
            return self.encoder.encode(*causal_analysis(audio, self.h), n_codebooks)
        return torch.stack(self.fast.encode(list(audio), n_codebooks, statistics))

    def _decode_window(self, codes: torch.Tensor, length: int) -> torch.Tensor:
        """One window's codes (C, n, T') -> audio (C, length)."""
        if self.h.causal:
            return causal_decode(self.encoder, self.decoder, codes.to(self.device), length)
        return torch.stack([out["audio"][:length] for out in self.fast.decode(list(codes))])

    def check_n_codebooks(self, n_codebooks: Optional[int]) -> int:
        return check_n_codebooks(n_codebooks, self.h.n_codebooks)

    def encode(self, audio: Audio, sample_rate: float, n_codebooks: Optional[int] = None) -> CodesFile:
        """Audio (L,) or (C, L) at `sample_rate` -> its codes, with the first `n_codebooks` stages."""
        blocks, rate, channels, length = _blocks_of(audio, sample_rate)
        return self._encode_stream(lambda: blocks, rate, channels, length, n_codebooks)

    def encode_file(self, path: str, n_codebooks: Optional[int] = None) -> CodesFile:
        """The codes of an audio file (wav, flac, ogg; any rate and channel count), read window by window."""
        _, rate, channels, length = _file_blocks(path)
        codes = self._encode_stream(lambda: _file_blocks(path)[0], rate, channels, length, n_codebooks)
        codes.name = path
        return codes

    # -- decoding ----------------------------------------------------------------------

    def check_compatible(self, codes: CodesFile) -> None:
        """A ValueError naming the file when `codes` was not made by this model, saying how it differs."""
        h = self.h
        for key in ("sampling_rate", "n_fft", "hop_size", "win_size", "ratio", "causal", "codebook_size"):
            theirs = getattr(codes, key)
            if theirs is not None and theirs != h[key]:
                raise ValueError(f"{codes.name}: encoded by a model with {key} {theirs}, this one has {h[key]}; "
                                 f"decode it with the config and checkpoints it was encoded with")
        if codes.n_codebooks > h.n_codebooks:
            raise ValueError(f"{codes.name}: encoded with {codes.n_codebooks} codebooks, this model has "
                             f"{h.n_codebooks}; decode it with the config and checkpoints it was encoded with")
        if codes.model_hash not in self.accepted_hashes:
            raise ValueError(f"{codes.name}: encoded by another model (weights {codes.model_hash.hex()[:12]}, "
                             f"this model {self.model_hash.hex()[:12]}); decode it with the checkpoints it was "
                             f"encoded with")
        if not (codes.n_codebooks and codes.channels and codes.original_length and codes.original_sample_rate):
            raise ValueError(f"{codes.name}: corrupted codes file ({codes.n_codebooks} codebooks, {codes.channels} "
                             f"channels, {codes.original_length} samples at {codes.original_sample_rate} Hz)")
        model_length = resampled_length(codes.original_length, codes.original_sample_rate, h.sampling_rate)
        if codes.model_length != model_length:
            raise ValueError(f"{codes.name}: corrupted codes file ({codes.original_length} samples at "
                             f"{codes.original_sample_rate} Hz, but {codes.model_length} at the model's rate where "
                             f"they make {model_length})")
        frames = sum(latent_frames(n, h) for _, n in self._stored_windows(codes))
        if frames != codes.codes.size(-1):
            raise ValueError(f"{codes.name}: corrupted codes file ({codes.codes.size(-1)} frames, "
                             f"its lengths need {frames})")

    @staticmethod
    def _stored_windows(codes: CodesFile) -> List[Tuple[int, int]]:
        return window_spans(codes.model_length, codes.chunk_length, codes.chunk_overlap)

    def _decode_windows(self, codes: CodesFile) -> Iterator[np.ndarray]:
        """Each window's decoded audio (length, channels) at the model rate; checks `codes` first."""
        self.check_compatible(codes)
        windows = self._stored_windows(codes)

        @torch.no_grad()
        def outputs() -> Iterator[np.ndarray]:
            start = 0
            for _, length in self._progress(windows, len(windows), "decoding"):
                frames = latent_frames(length, self.h)
                yield self._decode_window(codes.codes[..., start:start + frames], length).t().cpu().numpy()
                start += frames
        return outputs()

    def _output(self, windows: Iterable[np.ndarray], overlap: int, channels: int, rate: int, length: int,
                keep_model_rate: bool) -> Tuple[Iterator[np.ndarray], int]:
        """The crossfaded window outputs, back at the input's `rate` and `length` unless `keep_model_rate`."""
        joined = _crossfade(windows, overlap)
        if keep_model_rate:
            return joined, self.h.sampling_rate
        return _resampled(joined, self.h.sampling_rate, rate, channels, length), rate

    def _decoded(self, codes: CodesFile, keep_model_rate: bool) -> Tuple[Iterator[np.ndarray], int]:
        return self._output(self._decode_windows(codes), codes.chunk_overlap, codes.channels,
                            codes.original_sample_rate, codes.original_length, keep_model_rate)

    def decode(self, codes: CodesFile, keep_model_rate: bool = False) -> Tuple[np.ndarray, int]:
        """Codes -> (audio (C, L) float32, its rate): the input's rate and length unless `keep_model_rate`."""
        stream, rate = self._decoded(codes, keep_model_rate)
        return np.concatenate(list(stream)).T, rate

    def decode_to_file(self, codes: CodesFile, path: str, keep_model_rate: bool = False) -> float:
        """Decode into a 16-bit PCM wav, window by window; returns the audio's seconds."""
        stream, rate = self._decoded(codes, keep_model_rate)
        write_wav(path, stream, rate, codes.channels)
        return codes.seconds()

    # -- resynthesis (encode and decode in memory) ---------------------------------------

    def _resynth_stream(self, reader: Callable[[], Iterable[np.ndarray]], rate: int, channels: int, length: int,
                        keep_model_rate: bool, n_codebooks: Optional[int] = None) -> Tuple[Iterator[np.ndarray], int]:
        """`reader()` gives the input's blocks (length, channels) in order, each time it is called."""
        h = self.h
        n_codebooks = self.check_n_codebooks(n_codebooks)
        model_length = resampled_length(length, rate, h.sampling_rate)
        windows = self.windows(model_length)

        @torch.no_grad()
        def outputs() -> Iterator[np.ndarray]:
            statistics = self._statistics(reader(), rate, channels, model_length, windows)
            for audio in self._window_audio(reader(), rate, channels, model_length, windows, "resynthesising"):
                out = self.roundtrip(audio, n_codebooks, statistics)
                yield out.cpu().numpy().T
        return self._output(outputs(), self._chunking(windows)[1], channels, rate, length, keep_model_rate)

    def resynthesize(self, audio: Audio, sample_rate: float, keep_model_rate: bool = False,
                     n_codebooks: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """Audio (L,) or (C, L) -> (coded audio (C, L), its rate), as `decode(encode(audio))` up to
        float rounding (the straight-through latent instead of the codebook rows)."""
        blocks, rate, channels, length = _blocks_of(audio, sample_rate)
        stream, rate = self._resynth_stream(lambda: blocks, rate, channels, length, keep_model_rate, n_codebooks)
        return np.concatenate(list(stream)).T, rate

    def resynthesize_files(self, jobs: Sequence[Tuple[str, str]], keep_model_rate: bool = False,
                           n_codebooks: Optional[int] = None, batch_seconds: float = BATCH_SECONDS
                           ) -> Iterator[Tuple[str, Union[float, Exception]]]:
        """Resynthesise (input, output) file pairs; yields each input with its seconds, or the
        error that stopped it (the others go on).

        Files that fit one window run in batches of similar length, sorted by length, up to
        `batch_seconds` of padded audio per batch: on a GPU each batch is one forward pass.
        The outputs are those of `resynthesize_file`, to float rounding.
        """
        n_codebooks = self.check_n_codebooks(n_codebooks)
        batchable, alone = [], []
        for path, output in jobs:
            try:
                _, rate, channels, length = _file_blocks(path)   # the header only
            except ValueError as e:
                yield path, e
                continue
            length = resampled_length(length, rate, self.h.sampling_rate)
            fits = self.fast is not None and len(self.windows(length)) == 1
            (batchable if fits else alone).append((length * channels, path, output))
        batchable.sort()
        batch: List[Tuple[int, str, str]] = []
        for item in batchable:
            if batch and (len(batch) + 1) * item[0] > batch_seconds * self.h.sampling_rate:
                yield from self._resynth_batch(batch, keep_model_rate, n_codebooks)
                batch = []
            batch.append(item)
        if batch:
            yield from self._resynth_batch(batch, keep_model_rate, n_codebooks)
        yield from self._resynth_alone([(path, output) for _, path, output in alone], keep_model_rate, n_codebooks)

    def _resynth_alone(self, jobs: Sequence[Tuple[str, str]], keep_model_rate: bool, n_codebooks: Optional[int]
                       ) -> Iterator[Tuple[str, Union[float, Exception]]]:
        for path, output in jobs:
            try:
                yield path, self.resynthesize_file(path, output, keep_model_rate, n_codebooks)
            except FILE_ERRORS as e:
                yield path, e

    @torch.no_grad()
    def _resynth_batch(self, batch: Sequence[Tuple[int, str, str]], keep_model_rate: bool,
                       n_codebooks: Optional[int]) -> Iterator[Tuple[str, Union[float, Exception]]]:
        h = self.h
        loaded = []
        for _, path, output in batch:
            try:
                blocks, rate, channels, length = _file_blocks(path)
                model_length = resampled_length(length, rate, h.sampling_rate)
                audio = np.concatenate(list(_resampled(blocks, rate, h.sampling_rate, channels, model_length)))
                loaded.append((path, output, rate, channels, length, torch.from_numpy(audio.T.copy())))
            except FILE_ERRORS as e:
                yield path, e
        clips = [channel.to(self.device) for *_, audio in loaded for channel in audio]
        try:
            outputs = iter(self.fast.roundtrip(clips, n_codebooks))
        except (ValueError, RuntimeError):
            outputs = None
        del clips
        if outputs is None:
            # A batch can fail where its files alone would not (e.g. out of GPU memory): code
            # them one by one, outside the except block, whose traceback would keep the failed
            # batch's tensors alive, so that only a file that fails on its own is reported.
            yield from self._resynth_alone([(path, output) for path, output, *_ in loaded], keep_model_rate,
                                           n_codebooks)
            return
        for path, output, rate, channels, length, _ in loaded:
            try:
                audio = torch.stack([next(outputs)["audio"] for _ in range(channels)], dim=1).cpu().numpy()
                stream, out_rate = self._output([audio], 0, channels, rate, length, keep_model_rate)
                write_wav(output, stream, out_rate, channels)
                yield path, length / rate
            except FILE_ERRORS as e:
                yield path, e

    def resynthesize_file(self, path: str, output_path: str, keep_model_rate: bool = False,
                          n_codebooks: Optional[int] = None) -> float:
        """Resynthesise an audio file into a 16-bit PCM wav, window by window; returns its seconds."""
        _, rate, channels, length = _file_blocks(path)
        stream, out_rate = self._resynth_stream(lambda: _file_blocks(path)[0], rate, channels, length,
                                                keep_model_rate, n_codebooks)
        write_wav(output_path, stream, out_rate, channels)
        return length / rate
