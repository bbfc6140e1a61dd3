"""The graphdriver front: Docker's GraphDriver plugin protocol over the core.

``types`` decodes and checks the wire, ``app`` is the aiohttp application and its error mapping,
``driver`` holds Docker's calls, Init record and orphan sweep, ``dockerdb`` reads dockerd's layer
store, ``serve`` listens where dockerd looks for plugins, ``client`` speaks to a plugin as dockerd
does, and ``front`` ties them into one daemon for :func:`snapdriver.daemon.run`.
"""
