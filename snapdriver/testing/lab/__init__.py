"""The offline ZFS lab's host side (``vagrant/lab``): cache key, build, qemu, kernel-log triage.

Standard library only: ``vagrant/lab`` runs it with Debian's ``/usr/bin/python3`` on a machine
that has no venv yet, importing this package as the top-level package ``lab`` (every import
inside it is relative, and nothing here imports the rest of snapdriver).
"""
