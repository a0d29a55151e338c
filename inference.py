"""Resynthesise every audio file in `test_input_wavs_dir` through the trained codec.

    python inference.py [--config config.json] [--KEY VALUE ...]

Writes 16-bit PCM wavs named after the inputs (extension replaced by .wav) to
`test_wav_output_dir`, each exactly as long as its (resampled) input.
"""
import os
import time
from typing import Dict, List, Tuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from dataset import AUDIO_EXTENSIONS, load_audio
from models import Decoder, Encoder, remove_weight_norm
from spectral import amp_pha_spectrum
from utils import atomic_write, load_weights, run_cli


def load_codec(h, encoder_path: str, decoder_path: str, device: torch.device) -> Tuple[Encoder, Decoder]:
    """Encoder and decoder from release-format checkpoints, in eval mode with weight norm folded."""
    encoder, decoder = Encoder(h).to(device), Decoder(h).to(device)
    load_weights(encoder, encoder_path, "encoder", device)
    load_weights(decoder, decoder_path, "decoder", device)
    return remove_weight_norm(encoder).eval(), remove_weight_norm(decoder).eval()


def pad_to_hops(audio: torch.Tensor, hop_size: int) -> torch.Tensor:
    """Zero-pad (..., L) at the end to a whole number of hops (at most hop_size - 1 zeros)."""
    return F.pad(audio, (0, -audio.size(-1) % hop_size))


@torch.no_grad()
def codec_roundtrip(encoder: Encoder, decoder: Decoder, audio: torch.Tensor, h) -> Dict[str, torch.Tensor]:
    """Encode and decode audio (B, L).

    Returns codes (B, n_codebooks, T'), the decoder's predicted real/imag spectra
    (B, F, ratio*T') and audio (B, L): the input is padded to whole hops, run through the
    release's path unchanged and the output trimmed back to L (SPEC §4).
    """
    length = audio.size(-1)
    logamp, pha, _, _ = amp_pha_spectrum(pad_to_hops(audio, h.hop_size), h.n_fft, h.hop_size, h.win_size)
    # The quantizer's forward (straight-through sum included) keeps the release's exact numbers.
    latent, codes, _, _ = encoder.quantizer(encoder.continuous_latent(logamp, pha))
    _, _, real, imag, out = decoder(latent)
    return {"codes": codes, "real": real, "imag": imag, "audio": out.squeeze(1)[:, :length]}


def list_audio_files(folder: str) -> List[str]:
    """Audio files directly in `folder`, sorted; two with the same stem are an error."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"input folder not found: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXTENSIONS))
    stems: Dict[str, str] = {}
    for name in files:
        stem = os.path.splitext(name)[0]
        if stem in stems:
            raise ValueError(f"{os.path.join(folder, stems[stem])} and {os.path.join(folder, name)} "
                             f"would both be written as {stem}.wav")
        stems[stem] = name
    return [os.path.join(folder, f) for f in files]


def write_wav(path: str, audio: np.ndarray, sampling_rate: int) -> None:
    """16-bit PCM wav, written atomically."""
    atomic_write(path, lambda f: sf.write(f, audio, sampling_rate, subtype="PCM_16", format="WAV"))


def inference(h) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = list_audio_files(h.test_input_wavs_dir)
    encoder, decoder = load_codec(h, h.checkpoint_file_load_Encoder, h.checkpoint_file_load_Decoder, device)
    os.makedirs(h.test_wav_output_dir, exist_ok=True)
    total_audio = total_time = 0.0
    for path in files:
        audio = torch.from_numpy(load_audio(path, h.sampling_rate)).to(device)
        start = time.time()
        out = codec_roundtrip(encoder, decoder, audio.unsqueeze(0), h)["audio"][0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        total_time += time.time() - start
        total_audio += audio.numel() / h.sampling_rate
        name = os.path.splitext(os.path.basename(path))[0] + ".wav"
        write_wav(os.path.join(h.test_wav_output_dir, name), out.cpu().numpy(), h.sampling_rate)
    rtf = total_time / total_audio if total_audio else float("nan")
    print(f"Wrote {len(files)} files to {os.path.abspath(h.test_wav_output_dir)} "
          f"({total_audio:.1f} s of audio, RTF {rtf:.4f} on {device.type})")


def main(argv=None) -> None:
    run_cli(inference, argv, __doc__)

if __name__ == "__main__":
    main()
