"""PyTorch interop without torch: ``.pth`` reading (``pth_io``, allow-list unpickler) and writing
(``pth_write``), official state_dict <-> Flax variables (``convert``)."""
