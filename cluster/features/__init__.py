"""Run-level features, each plugged into the loop through the typed stages of
``cluster.stages`` (chosen once, by ``cluster.loop.wiring.build_stages``)."""
