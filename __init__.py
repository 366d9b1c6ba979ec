"""deitpipe: offline DeiT distillation.

Stage one (``deitpipe.teacher`` + ``deitpipe.shards``) runs a convnet teacher once over a data set
and stores its labels per augmented view in WebDataset shards. Stage two (``deitpipe.student``)
trains DeiT students from those shards without the teacher. ``deitpipe.pipeline`` runs both on Ray.
"""

__version__ = "0.1.0"
