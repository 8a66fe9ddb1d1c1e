"""The data path, in flow order: camera -> source -> decode -> frame slot -> batcher ->
preprocess -> engine runner -> postprocess. Each camera has its own source thread; each engine
worker runs batcher, runner and postprocessing."""
