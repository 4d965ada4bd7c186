"""``python -m olm.train``: the same as ``olm-train`` (torchrun and olm's own child ranks start it this way)."""

from olm.train.cli import main

main()
