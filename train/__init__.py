"""The LeNet-BN training program, ``python -m train.lenet``, and its tools.

The program, one job per module, in the shape of the flax examples:

    lenet         ``main``: parses the flags, joins a multi-process run, trains and evaluates
    config        ``Config``: every option once (flag, help, check, resume and compile rules)
    train         ``train_and_evaluate`` and the epoch loop
    prepare       a run before its first step: workdir, data, compiled steps, checkpoints
    steps         model, optimizer, ``TrainState``, the jitted train and eval steps
    population    PreciseBN and FrozenBN: the images and the compiled recomputation
    checkpoints   Orbax checkpoints: asynchronous saves, checksums, verified restores
    workdir       the workdir lock, archiving a previous run, atomic writes, storage errors
    metrics       ``metrics.jsonl``, ``curves.png``, the epoch and ``final:`` lines
    errors        the errors and their exit statuses
    data          datasets (IDX files, TFDS) and their pixel statistics
    batching      batches in a deterministic order, a function of ``(seed, epoch)``
    idx           the IDX file format of MNIST-style datasets
    model         the seed's LeNet as a Flax module
    conv          the fast XLA:CPU convolution the LeNet uses by default
    devices       ``--devices``: the run's devices, fake CPU devices when needed
    distributed   meshes and multi-process runs (``jax.distributed``), failure bounds
    cluster       where a multi-process run's settings come from
    runtime       allocator settings applied at start (the step's buffers stay in the heap)

Its tools for trained models, beside it because they read its checkpoints and model:

    export        ``python -m train.export``: a checkpoint as an inference model, BN folded
    port          the seed's PyTorch LeNet, its weights converted both ways

The experiments on BN, ``python -m train.experiments``, are the subpackage
:mod:`train.experiments`; they build on the program, and the program imports nothing of
them.
"""
