"""The general-purpose compressors a model's bits/byte is shown against (standard library only, so the run's final
line can be written without the training stack)."""

import bz2
import gzip
import lzma

# Each at its strongest setting: name -> (how the final line shows it, compress).
COMPRESSORS = {
    "gzip": ("gzip -9", lambda text: gzip.compress(text, 9)),
    "bz2": ("bz2 -9", lambda text: bz2.compress(text, 9)),
    "xz": ("xz -9e", lambda text: lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)),
}
