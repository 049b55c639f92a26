"""The conditional demo: the embedded digits with their labels, one generator for every
digit, trained in minutes on a CPU; `sample classes` draws one row per digit."""

from dcgan_jax.config import overlay


def get_config():
    config = overlay("mnist.py", beside=__file__)
    config.model.num_classes = 10
    # The tutorials' cDCGAN: the class joined to z, and as maps to D's input (see
    # benchmarks/RESULTS.md for the other conditionings on these digits).
    config.model.g_cond = "concat"
    config.model.d_cond = "concat"
    # Ten columns: the grids show the digits 0 to 9 from left to right.
    config.sample_grid = "10x10"
    return config
