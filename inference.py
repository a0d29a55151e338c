"""Resynthesise audio through a trained APCodec (encode, quantise, decode).

    python inference.py [--config config.json] [--stream --chunk_ms MS] [--KEY VALUE ...]

Every wav, flac and ogg file under `test_input_wavs_dir` (walked recursively; a single
file works too) is written to `test_wav_output_dir` as a 16-bit PCM wav with the same
relative path and name, each exactly as long as its input at the model's rate. All inputs
are checked before anything is written. When the checkpoints were trained with another
network than the config describes, the config.json that training wrote beside them is
used for the network. With --stream a causal codec (`causal: true`) takes each file in
chunks of --chunk_ms milliseconds, as a live stream would, and writes the same files.
"""
import functools
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch

from checkpoints import load_generator
from config import AttrDict, make_parser, run_cli
from dataset import AUDIO_EXTENSIONS, audio_index, load_audio
from models import Decoder, Encoder, remove_weight_norm
from spectral import amp_pha_spectrum, pad_for_analysis
from streaming import causal_roundtrip, stream_roundtrip
from utils import atomic_write, pick_device, synchronize


def load_codec(h: AttrDict, encoder_path: str, decoder_path: str, device: torch.device
               ) -> Tuple[Encoder, Decoder, AttrDict]:
    """Encoder and decoder for inference (eval mode, weight norm folded), and the config that
    matches their weights (see `checkpoints.load_generator`)."""
    encoder, decoder, h = load_generator(h, encoder_path, decoder_path, device)
    return remove_weight_norm(encoder).eval(), remove_weight_norm(decoder).eval(), h


@torch.no_grad()
def codec_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h) -> Dict[str, torch.Tensor]:
    """Encode and decode audio (B, L), any L >= 1.

    Returns codes (B, n_codebooks, T'), the decoder's predicted real/imag spectra
    (B, F, ratio*T') and audio (B, L). The input is zero-padded for the analysis (to whole
    hops, and to n_fft / 2 for very short clips), run through the release's path unchanged
    and the output trimmed back to L. A causal codec runs `streaming.causal_roundtrip`.
    """
    if h.causal:
        return causal_roundtrip(encoder, decoder, audio, h)
    length = audio.size(-1)
    logamp, pha, _, _ = amp_pha_spectrum(pad_for_analysis(audio, h.n_fft, h.hop_size),
                                         h.n_fft, h.hop_size, h.win_size)
    quantized = encoder(logamp, pha)
    _, _, real, imag, out = decoder(quantized.latent)
    return {"codes": quantized.codes, "real": real, "imag": imag, "audio": out.squeeze(1)[:, :length]}


def write_wav(path: str, audio: np.ndarray, sampling_rate: int) -> None:
    """16-bit PCM wav, written atomically."""
    atomic_write(path, lambda f: sf.write(f, audio, sampling_rate, subtype="PCM_16", format="WAV"))


def check_inputs(files: Dict[str, str], location: str) -> None:
    """Every input must be readable audio with at least one sample; one line names the first that is not."""
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {location}")
    for path in files.values():
        try:
            frames = sf.info(path).frames
        except Exception as e:
            raise ValueError(f"cannot read audio file {path}: {e}") from None
        if frames < 1:
            raise ValueError(f"audio file {path} holds no samples")


OutputHook = Callable[[str, Dict[str, torch.Tensor]], None]


Roundtrip = Callable[[Encoder, Decoder, torch.Tensor, AttrDict], Dict[str, torch.Tensor]]


def resynthesize(h, encoder: Encoder, decoder: Decoder, files: Dict[str, str], output_dir: str,
                 device: torch.device, on_output: Optional[OutputHook] = None,
                 roundtrip: Roundtrip = codec_roundtrip) -> Dict[str, float]:
    """Resynthesise each file of {key: path} into output_dir/key.wav with `roundtrip`.

    `on_output(key, roundtrip result)` sees every result. Returns the totals: files,
    audio seconds and the real-time factor of encode + decode (file I/O excluded; the first
    file gets one untimed pass, which pays for allocations and kernel selection).
    """
    audio_seconds = codec_seconds = 0.0
    for i, (key, path) in enumerate(files.items()):
        audio = torch.from_numpy(load_audio(path, h.sampling_rate)).to(device).unsqueeze(0)
        if i == 0:
            roundtrip(encoder, decoder, audio, h)
        synchronize(device)
        start = time.perf_counter()
        out = roundtrip(encoder, decoder, audio, h)
        synchronize(device)
        codec_seconds += time.perf_counter() - start
        audio_seconds += audio.size(-1) / h.sampling_rate
        write_wav(os.path.join(output_dir, key + ".wav"), out["audio"][0].cpu().numpy(), h.sampling_rate)
        if on_output is not None:
            on_output(key, out)
    totals = {"files": len(files), "audio_seconds": audio_seconds, "rtf": codec_seconds / audio_seconds}
    print(f"Resynthesised {len(files)} files ({audio_seconds:.1f} s of audio) into "
          f"{os.path.abspath(output_dir)}: RTF {totals['rtf']:.4f} on {device.type} "
          f"with {torch.get_num_threads()} threads")
    return totals


def inference(h: AttrDict, chunk_ms: Optional[float] = None) -> Dict[str, float]:
    """The release's job: resynthesise `test_input_wavs_dir` into `test_wav_output_dir`;
    streamed in chunks of `chunk_ms` milliseconds when given (causal codecs only)."""
    device = pick_device()
    files = audio_index(h.test_input_wavs_dir)
    check_inputs(files, h.test_input_wavs_dir)
    encoder, decoder, h = load_codec(h, h.checkpoint_file_load_Encoder, h.checkpoint_file_load_Decoder, device)
    roundtrip = codec_roundtrip
    if chunk_ms is not None:
        if chunk_ms <= 0:
            raise ValueError(f"--chunk_ms must be positive, got {chunk_ms}")
        if not h.causal:
            raise ValueError(f"--stream needs a causal codec ('causal': true); {h.source} describes the paper's "
                             f"non-causal model")
        roundtrip = functools.partial(stream_roundtrip, chunks=max(1, round(chunk_ms * h.sampling_rate / 1000)))
    return resynthesize(h, encoder, decoder, files, h.test_wav_output_dir, device, roundtrip=roundtrip)


def main(argv: Optional[List[str]] = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--stream", action="store_true", help="stream each file through the causal codec")
    parser.add_argument("--chunk_ms", type=float, default=10.0, help="stream chunk in milliseconds (default 10)")
    run_cli(lambda h, args: inference(h, args.chunk_ms if args.stream else None), parser, argv)


if __name__ == "__main__":
    main()
