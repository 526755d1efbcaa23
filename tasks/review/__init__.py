"""Human review: the items the teacher is unsure of go to reviewers in Label Studio, their answers come back.

Why a concept of its own: nothing else can fix a blind spot the teacher has everywhere (on NYT
it never answers "neutral"). ``select`` picks the items, ``formats`` writes them as Label
Studio tasks (the teacher's label as a scored prediction) or Argilla records,
``labelstudio`` is the HTTP client, and ``loop`` is ``distill review export`` / ``import``.
The versioned human-label files a run learns from live in tasks/data/human_labels.py.
"""
