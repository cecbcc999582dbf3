"""The reference training harness: the paper's models, data, training loop, durable runs and recipes.

It sits on top of the library (``hessfast.lanczos``, ``hessfast.variance``, ``hessfast.theory``,
``hessfast.tuner``); nothing in the library imports it.

* :mod:`.models`   - VGG-16 (with/without BN), PreResNet-110, WRN-28x10, MLP, small CNN; ``build_model``.
* :mod:`.data`     - digits and the Gaussian mixture (embedded), CIFAR-10/100 and ImageNet32 from local
  folders, the paper's augmentation, ``BatchLoader``.
* :mod:`.train`    - SGD/Adam/AdamW, the schedule of equation 21, SWA, NaN/Inf detection, resume.
* :mod:`.runs`     - run folders: config.json, metrics.jsonl, checkpoint.pt, status.json, summary.md.
* :mod:`.recipes`  - the paper's experiments at tiny/small/paper scale.
* :mod:`.demo`     - ``hessfast demo``.
"""
