"""Ray Serve deployments: model replica, expert shards, placement, transports."""
