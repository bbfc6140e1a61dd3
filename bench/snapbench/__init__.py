"""snapbench: snapdriver (btrfs backend) against dockerd's in-tree drivers, side by side.

Run it as ``bench/run``; ``bench/README.md`` says what each scenario measures.
"""
