"""Past one machine, on Ray (the ``ray`` extra): one task per category (fanout.py), batch
scoring with Ray Data (batch_predict.py), data-parallel training with Ray Train (ddp.py).
connect.py joins the cluster. Nothing below this layer imports Ray."""
