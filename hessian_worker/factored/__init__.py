"""What the schemes that replace linear layers by factored modules (``basis``, ``relaxed``) share.

Both install, per class, modules that hold ONE shared Parameter and their own factors; both find
the layers, count unique parameters, tie the classes of ``tie`` families in the same plan, save a
layout beside the tensors and rebuild it on load. Those steps live here once (layers.py, apply.py,
io.py); each scheme keeps only its own module and its own fit.
"""
