"""The review loop through a real Label Studio, as a team runs it: a run, `distill review export`, reviewers
answering in Label Studio (through its API, as the UI does), `distill review import`, and the next run training
on exactly the reviewed items with the reviewers' labels, none of them in both training data and gold."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill.cli import main as cli_main
from tests.conftest import free_port
from tests.test_distill_flow import cfg_dict, write_data

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def labelstudio(tmp_path_factory):
    """A real Label Studio on loopback, started the way `distill up --labelstudio` starts it."""
    from distill import servers

    work = tmp_path_factory.mktemp("labelstudio")
    got = servers.up(work, which=("labelstudio",), labelstudio_port=free_port(), timeout_s=300)
    cred = json.loads((servers.state_dir(work) / "servers" / "labelstudio" / "credentials.json").read_text())
    try:
        yield got["labelstudio"].url, cred["token"]
    finally:
        assert servers.down(work) == ["labelstudio"]


def sign_up(url: str, email: str, invite: str = "") -> str:
    """Sign a reviewer up through Label Studio's own form (with the organisation's invite link, or without);
    their API token, or "" when Label Studio refused."""
    jar = http.cookiejar.CookieJar()
    op = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = url + "/user/signup/" + (f"?token={invite}" if invite else "")
    html = op.open(page).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert csrf
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf.group(1), "email": email, "password": "rev-pass-4821"})
    try:
        op.open(urllib.request.Request(page, data=form.encode(), headers={"Referer": page}))
        return json.loads(op.open(url + "/api/current-user/token").read())["token"]
    except urllib.error.HTTPError:
        return ""


def second_reviewer(url: str, admin_token: str, email: str) -> str:
    """A second reviewer, joined through the organisation's invite link (open sign-up is off); their API token."""
    req = urllib.request.Request(url + "/api/invite", headers={"Authorization": f"Token {admin_token}"})
    invite = json.loads(urllib.request.urlopen(req).read())["token"]
    return sign_up(url, email, invite)


def client(url: str, token: str, monkeypatch):
    from tasks.review.labelstudio import LabelStudio

    monkeypatch.setenv("REVIEWER_TOKEN", token)
    return LabelStudio(url, token_env="REVIEWER_TOKEN")


def test_review_loop_through_a_real_label_studio(
    tmp_path, fake_teacher, binary_prompt, prefect_api, labelstudio, monkeypatch, capsys
):
    import mlflow

    url, token = labelstudio
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    write_data(tmp_path, 64, 24)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url, "samples": 1})
    raw["review"] = {"labels_dir": str(tmp_path / "reviews"), "url": url, "gold_share": 0.25}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()

    # export: 12 tasks with the teacher's label as a scored prediction; again: nothing new
    assert cli_main(["review", "export", str(cfg), "--select", "low_confidence", "--n", "12"]) == 0
    assert "12 items chosen by low_confidence: 12 new tasks sent" in capsys.readouterr().out
    assert cli_main(["review", "export", str(cfg), "--select", "low_confidence", "--n", "12"]) == 0
    assert "0 new tasks sent, 12 already in the project" in capsys.readouterr().out
    state = json.loads((tmp_path / "reviews" / "labelstudio.json").read_text())
    ls = client(url, token, monkeypatch)
    tasks = ls.tasks(state["project_id"])
    assert len(tasks) == 12 and all(t["predictions"] and t["data"]["prompt_version"] != "unknown" for t in tasks)
    pred = tasks[0]["predictions"][0]
    assert 0 < pred["score"] <= 1 and pred["result"][0]["value"]["choices"][0] == tasks[0]["data"]["teacher_label"]

    # reviewers: each correct the teacher (the opposite label, so a human label is visible where it lands); a second
    # reviewer disagrees with the first on one task
    flip = {"positive": "negative", "negative": "positive"}
    human = {}
    for t in tasks:
        human[t["data"]["distill_id"]] = flip[t["data"]["teacher_label"]]
        ls.annotate(t["id"], human[t["data"]["distill_id"]], from_name="label", to_name="text")
    assert not sign_up(url, "stranger@example.com")  # no invite link: Label Studio refuses
    other = client(url, second_reviewer(url, token, "reviewer2@example.com"), monkeypatch)
    contested = tasks[0]["data"]["distill_id"]
    other.annotate(tasks[0]["id"], tasks[0]["data"]["teacher_label"], from_name="label", to_name="text")

    assert cli_main(["review", "import", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "13 annotations of 12 items" in out and "new version 1" in out and "logged to MLflow run" in out
    assert cli_main(["review", "import", str(cfg)]) == 0  # idempotent
    assert "unchanged: still version 1" in capsys.readouterr().out
    files = sorted((tmp_path / "reviews").glob("human-labels-v*.parquet"))
    assert [f.name for f in files] == ["human-labels-v0001.parquet"]
    labels_file = pd.read_parquet(files[0])
    assert len(labels_file) == 13 and labels_file["reviewer"].nunique() == 2  # both reviewers kept
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    imports = mlflow.search_runs(experiment_names=["distill"], filter_string="tags.`distill.kind` = 'review-import'")
    assert len(imports) == 1
    run = mlflow.get_run(imports["run_id"].iloc[0])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["human-labels"]

    # the next run trains on exactly the reviewed items with the reviewers' labels; the gold share is gold only;
    # the contested item (on_disagreement: teacher) keeps the teacher's label
    assert cli_main(["run", str(cfg), "--no-progress", "--set", "run_name=dag2", "--summary-json", "s2.json"]) == 0
    capsys.readouterr()
    train = pd.read_parquet(tmp_path / "runs" / "dag2" / "student" / "train_set.parquet")
    gold = pd.read_parquet(tmp_path / "runs" / "dag2" / "input" / "gold_with_reviews.parquet")
    reviewed_gold = set(gold["id"]) & set(human)
    by_human = train[train["source"] == "human"]
    assert set(by_human["id"]) == set(human) - reviewed_gold - {contested}
    assert all(by_human.set_index("id")["label"][i] == human[i] for i in by_human["id"])
    assert reviewed_gold and not set(train["id"]) & set(gold["id"])  # no item in both
    assert set(gold["id"]) == {f"g{i}" for i in range(24)} | reviewed_gold
    s = json.loads((tmp_path / "s2.json").read_text())
    assert s["human_labelled_items"] == len(by_human) and s["gold_items_from_review"] == len(reviewed_gold)
    assert s["review_items"] == 12 and s["review_disagreements"] == 1 and s["review_labels_version"] == 1
    assert s["review_usd"] == pytest.approx(13 * 0.25)
    card = (tmp_path / "runs" / "dag2" / "model_card.md").read_text()
    assert f"{len(by_human)} items with a reviewer's label, human-label file version 1" in card

    # bad input, one clear line each and nothing imported: a label outside the set, a server that is down, a
    # project that no longer exists
    ls.annotate(tasks[1]["id"], "neutral", from_name="label", to_name="text")
    assert cli_main(["review", "import", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"task {tasks[1]['id']}" in err and "'neutral' is not one of" in err and "nothing was written" in err
    assert cli_main(["review", "import", str(cfg), "--set", f"review.url=http://127.0.0.1:{free_port()}"]) == 2
    assert "is not reachable" in capsys.readouterr().err
    ls.delete_project(state["project_id"])
    assert cli_main(["review", "import", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"project {state['project_id']}" in err and "no longer exists" in err and token not in err
    assert sorted(Path(tmp_path / "reviews").glob("human-labels-v*.parquet")) == files


def test_export_writes_files_for_teams_that_import_by_hand(
    tmp_path, fake_teacher, binary_prompt, prefect_api, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, 40, 12)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url})
    raw["review"] = {"labels_dir": str(tmp_path / "reviews")}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert cli_main(["annotate", str(cfg), "--no-progress"]) == 0
    for fmt in ("labelstudio-json", "argilla-json"):
        out = tmp_path / f"{fmt}.json"
        assert (
            cli_main(
                ["review", "export", str(cfg), "--select", "random", "--n", "5", "--format", fmt, "--out", str(out)]
            )
            == 0
        )
        recs = json.loads(out.read_text())
        assert len(recs) == 5
    ls, ar = (json.loads((tmp_path / f"{f}.json").read_text()) for f in ("labelstudio-json", "argilla-json"))
    assert [r["data"]["distill_id"] for r in ls] == [r["id"] for r in ar]  # the same items
    assert all(r["suggestions"][0]["question_name"] == "label" for r in ar)
    # disagreement without a student and with one sample per item has nothing to go on: said, not guessed
    capsys.readouterr()
    assert (
        cli_main(
            ["review", "export", str(cfg), "--select", "disagreement", "--format", "argilla-json", "--out", "x.json"]
        )
        == 2
    )
    assert "no student to disagree with" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
