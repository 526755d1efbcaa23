"""The selected items as Label Studio tasks or Argilla records: the text, the teacher's label as a scored
suggestion reviewers confirm or correct, and where it came from (run, prompt version).

Why both: Label Studio takes model predictions with a score as pre-annotations, Argilla
takes suggestions with a score; autolabel and distilabel hand their low-confidence items to
Argilla, and teams that import by hand need a file either tool reads.
"""

from __future__ import annotations

from typing import Any, Optional
from xml.sax.saxutils import escape

from tasks.review.select import ReviewItem

FROM_NAME = "label"  # the Choices control's name in the labelling config
TO_NAME = "text"  # the Text object's name


def label_config(labels: list[str]) -> str:
    """Label Studio's labelling interface: the text and one required single choice among the labels."""
    choices = "\n".join(f'    <Choice value="{escape(lab, {chr(34): "&quot;"})}"/>' for lab in labels)
    return (
        "<View>\n"
        f'  <Text name="{TO_NAME}" value="$text"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def _meta(row: ReviewItem, run_id: str, prompt_version: str) -> dict[str, Any]:
    return {
        "distill_id": str(row.id),
        "run_id": run_id,
        "prompt_version": prompt_version,
        "teacher_label": row.teacher_label,
        "teacher_confidence": round(float(row.teacher_confidence), 4),
        "student_label": row.student_label,
        "selected_by": row.selected_by,
    }


def labelstudio_tasks(
    items: list[ReviewItem], *, run_id: str, prompt_version: str, model_version: str
) -> list[dict[str, Any]]:
    """One task per item; the teacher's label is its prediction (absent where the teacher abstained)."""
    out = []
    for row in items:
        task: dict[str, Any] = {"data": {"text": str(row.text), **_meta(row, run_id, prompt_version)}}
        if row.teacher_label is not None:
            task["predictions"] = [
                {
                    "model_version": model_version,
                    "score": round(float(row.teacher_confidence), 4),
                    "result": [
                        {
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "type": "choices",
                            "value": {"choices": [row.teacher_label]},
                        }
                    ],
                }
            ]
        out.append(task)
    return out


def argilla_records(items: list[ReviewItem], *, run_id: str, prompt_version: str, agent: str) -> list[dict[str, Any]]:
    """Argilla (2.x) records: a ``text`` field, a ``label`` question's suggestion with its score, metadata."""
    out = []
    for row in items:
        rec: dict[str, Any] = {
            "id": str(row.id),
            "fields": {"text": str(row.text)},
            "metadata": _meta(row, run_id, prompt_version),
        }
        if row.teacher_label is not None:
            rec["suggestions"] = [
                {
                    "question_name": FROM_NAME,
                    "value": row.teacher_label,
                    "score": round(float(row.teacher_confidence), 4),
                    "agent": agent,
                }
            ]
        out.append(rec)
    return out


def chosen_label(result: list[dict[str, Any]]) -> Optional[str]:
    """The label an annotation's result holds (None: the reviewer chose nothing)."""
    for r in result or []:
        if r.get("from_name") == FROM_NAME and r.get("type") == "choices":
            choices = (r.get("value") or {}).get("choices") or []
            if len(choices) == 1:
                return str(choices[0])
            if len(choices) > 1:
                raise ValueError(f"an annotation chose {len(choices)} labels ({choices}): the task is single-choice")
    return None
