"""Docker's GraphDriver plugin protocol: wire types, the aiohttp application, listeners."""
