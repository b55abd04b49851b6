"""Many users at once (issue 21): the page in front of a paced OpenAI-compatible server (tests/paced_server.py).

The parts are real: a rendered app (engine=openai, default settings unless a test says otherwise) serving over
loopback, a server streaming at a known pace, clients reading gradio's event stream over HTTP. The unit tests at
the top drive the page's own pieces (the waiting line, the coalescing inbox) on a real event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from pathlib import Path
from typing import List, Optional

import psutil
import pytest
from apprunner import AppProcess, render
from faultkit import wait_for
from paced_server import MODEL, PacedServer


def settings_for(app_modules: Path, **env: str):
    from xlab_chat.settings import load_settings

    return load_settings(env, {"model_repo": "https://example.org/owner/model.git", "engine_url": "http://h:1/v1",
                               "engine_model": "m"})


@pytest.mark.parametrize("engine, limit", [("transformers", 1), ("lmdeploy", 64), ("vllm", 64), ("openai", 64)])
def test_concurrency_and_queue_defaults_fit_the_engine_and_env_overrides_them(app_modules, engine, limit):
    settings = settings_for(app_modules, ENGINE=engine)
    assert (settings.concurrency_limit, settings.queue_size) == (limit, 4 * limit + 16)
    settings = settings_for(app_modules, ENGINE=engine, CONCURRENCY_LIMIT="5", QUEUE_SIZE="0")
    assert (settings.concurrency_limit, settings.queue_size) == (5, 0)


def test_a_bad_queue_size_is_refused_with_its_range(app_modules):
    from xlab_chat.settings import SettingsError

    with pytest.raises(SettingsError, match="QUEUE_SIZE=-1 is out of range — use a value from 0 to 2048"):
        settings_for(app_modules, QUEUE_SIZE="-1")


def test_the_line_grants_slots_in_arrival_order_and_refuses_one_too_many(app_modules):
    from xlab_chat.page.line import WaitingLine

    async def scenario() -> list:
        line = WaitingLine(slots=2, places=2)
        first, second, third, fourth = (line.join() for _ in range(4))
        assert first.granted and second.granted and not third.granted and not fourth.granted
        assert line.join() is None  # both slots busy, both places taken
        places = [await line.turn(third).__anext__(), await line.turn(fourth).__anext__()]
        line.leave(third)  # a waiting user closed the tab: the one behind moves up
        assert [ahead async for ahead in _first(line.turn(fourth))] == [0]
        line.leave(first)  # a reply ended: the next in line streams
        assert fourth.granted and [ahead async for ahead in line.turn(fourth)] == []
        assert line.join() is not None and line.waiting == 1  # one slot busy, one more in line again
        return places + [line.active]

    assert asyncio.run(scenario()) == [0, 1, 2]


async def _first(turns):
    async for ahead in turns:
        yield ahead
        return


def test_the_inbox_sends_the_first_text_at_once_then_at_a_cadence_and_the_end_at_once(app_modules):
    """A thread puts 60 pieces 5 ms apart (200 tokens/s), then the end; the page reads at a 100 ms cadence."""
    from xlab_chat.engines import protocol
    from xlab_chat.page.stream import Inbox, batches

    pieces = [f"t{i} " for i in range(60)]

    async def scenario() -> tuple:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        put_at = {}

        def produce() -> None:
            for piece in pieces:
                put_at.setdefault("first", loop.time())
                inbox.put(piece)
                time.sleep(0.005)
            time.sleep(0.03)
            put_at["end"] = loop.time()
            inbox.put(protocol.FINISHED)

        threading.Thread(target=produce, daemon=True).start()
        got: List[tuple] = []
        async for items in batches(inbox, lambda: 0.1):
            got.append((loop.time(), items))
            if protocol.FINISHED in items:
                break
        return got, put_at

    got, put_at = asyncio.run(scenario())
    texts = [item for _, items in got for item in items if isinstance(item, str)]
    assert texts == pieces  # nothing lost, nothing reordered
    assert got[0][1] == [pieces[0]] and got[0][0] - put_at["first"] < 0.05  # the first token alone, at once
    assert len(got) <= 6, [len(items) for _, items in got]  # ~0.33 s of tokens at 100 ms: not one update each
    assert got[-1][1][-1] is protocol.FINISHED and got[-1][0] - put_at["end"] < 0.05  # the end did not wait


def test_the_cadence_grows_with_the_streams_between_bounds(app_modules):
    from xlab_chat.page.stream import FASTEST_S, PAGE_UPDATES_PER_S, SLOWEST_S, cadence

    assert cadence(1) == FASTEST_S and cadence(10_000) == SLOWEST_S
    assert cadence(64) == pytest.approx(64 / PAGE_UPDATES_PER_S)


class Chat:
    """One user on gradio's /gradio_api/call/chat: join, then read the event stream as it arrives."""

    def __init__(self, url: str, message: str, tokens: int) -> None:
        self.url, self.body = url, json.dumps({"data": [message, None, "", tokens, 0.0, 0.8, 1.0]})
        self.updates: List[str] = []
        self.final: Optional[str] = None
        self.error: Optional[str] = None
        self.first_text_s: Optional[float] = None

    def run(self, leave_at: Optional[str] = None) -> None:
        """Read to the end, or close the connection (a closed tab) at the first update starting with leave_at."""
        host, port = self.url.split("//")[1].split(":")
        started = time.monotonic()
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        connection.request("POST", "/gradio_api/call/chat", self.body, {"Content-Type": "application/json"})
        event_id = json.loads(connection.getresponse().read())["event_id"]
        connection.request("GET", f"/gradio_api/call/chat/{event_id}")
        response, event = connection.getresponse(), ""
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("generating", "complete"):
                value = json.loads(line[5:])
                text = value[0] if value and isinstance(value[0], str) else ""
                self.updates.append(text)
                if event == "complete":
                    self.final = text
                if text.startswith("word") and self.first_text_s is None:
                    self.first_text_s = time.monotonic() - started
                if leave_at is not None and text.startswith(leave_at):
                    connection.sock.close()
                    return
            elif line.startswith("data:") and event == "error":
                self.error = line[5:].strip()
        connection.close()


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory):
    """engine=openai, default settings, in front of a server that slows down above 16 open streams."""
    base = tmp_path_factory.mktemp("crowd")
    with PacedServer(rate=20, tokens=30, first_delay=0.05, slow_above=16) as server:
        folder = render(base / "out", engine="openai", engine_url=server.url, engine_model=MODEL, ui_language="en",
                        validate_model_repo=False)
        app = AppProcess(folder, {}, base / "app.log")
        try:
            app.wait_stage(("ready",))
            yield app, server
        finally:
            app.stop()


def wave(app: AppProcess, users: int, within_s: float, leaving: set) -> List[Chat]:
    """`users` chats arriving at random moments within `within_s` seconds; those in `leaving` close mid-reply."""
    chats = [Chat(app.url, f"hello {i}", 30) for i in range(users)]
    moments = sorted(random.Random(users).uniform(0, within_s) for _ in range(users))
    began = time.monotonic()

    def user(index: int) -> None:
        time.sleep(max(0.0, began + moments[index] - time.monotonic()))
        chats[index].run(leave_at="word" if index in leaving else None)  # some tabs close mid-reply

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return chats


@pytest.mark.e2e
def test_two_hundred_users_in_ten_seconds_all_get_replies_and_nothing_leaks(crowd):
    app, server = crowd
    page = psutil.Process(app.process.pid)
    expected = "".join(f"word{i} " for i in range(30))
    leaving = set(range(3, 200, 10))  # 20 users close their tab mid-reply
    rss, threads = [], []
    for _ in range(2):  # the first wave warms up; the second must not grow the page
        before = server.stats()
        chats = wave(app, 200, 10.0, leaving)
        wait_for(lambda: server.stats()["open"] == 0, 10, what="every upstream stream closed")
        after = server.stats()
        stayed = [chat for i, chat in enumerate(chats) if i not in leaving]
        assert [c.error for c in chats if c.error] == []  # no error page, no "queue is full"
        assert all(chat.final == expected for chat in stayed), [c.final for c in stayed if c.final != expected][:3]
        assert all(chats[i].first_text_s is not None for i in leaving)
        assert after["hangups"] - before["hangups"] == len(leaving)  # each closed tab closed its upstream request
        assert after["finished"] - before["finished"] == len(stayed)
        # The default for a server engine is reached: at 64 streams each gets 5 tokens/s, so more users arrive than
        # leave (gradio alone would run 40 at most: its default max_threads). Above it only by streams whose user
        # left: the server learns of a closed connection at its next write, after the page gave the slot away.
        assert 64 <= after["peak"] <= 64 + len(leaving), after
        assert any(update.startswith("⏳ You are number") for chat in chats for update in chat.updates)
        time.sleep(2)
        rss.append(page.memory_info().rss)
        threads.append(page.num_threads())
    assert app.status()["generating"] == 0
    assert rss[1] <= rss[0] + 20 * 2**20, [r >> 20 for r in rss]
    assert threads[1] <= threads[0] + 2, threads
    assert "Traceback" not in app.log


@pytest.mark.e2e
def test_waiting_users_see_their_place_and_a_full_line_is_told_in_chinese(tmp_path: Path):
    with PacedServer(rate=20, tokens=200) as server:
        folder = render(tmp_path / "out", engine="openai", engine_url=server.url, engine_model=MODEL,
                        ui_language="zh", validate_model_repo=False)
        app = AppProcess(folder, {"CONCURRENCY_LIMIT": "1", "QUEUE_SIZE": "2"}, tmp_path / "app.log")
        try:
            app.wait_stage(("ready",))
            chats = [Chat(app.url, f"你好 {i}", tokens) for i, tokens in enumerate((200, 40, 40))]  # 10 s, 2 s, 2 s
            runners = [threading.Thread(target=chats[0].run)]
            runners[0].start()
            time.sleep(0.4)
            leaver = Chat(app.url, "我先走了", 40)
            leaver.run(leave_at="⏳")  # waits first in line, then closes the tab: the place must be freed
            time.sleep(6)  # the page repeats a place every 5 s, so gradio learns the tab is gone
            for chat in chats[1:]:  # two wait, in this order
                runners.append(threading.Thread(target=chat.run))
                runners[-1].start()
                time.sleep(0.4)
            one_too_many = Chat(app.url, "还有我", 40)
            one_too_many.run()
            for runner in runners:
                runner.join(60)
        finally:
            app.stop()
    assert one_too_many.error is None
    assert one_too_many.final == "⏳ 现在使用的人太多，排队已满（2 人在等待）。请过一会儿再发送。"
    assert leaver.updates == ["⏳ 正在排队：你是第 1 位。轮到你时会自动开始回复，请不要关闭页面。"]
    assert chats[1].updates[0] == "⏳ 正在排队：你是第 1 位。轮到你时会自动开始回复，请不要关闭页面。"
    assert chats[2].updates[0].startswith("⏳ 正在排队：你是第 2 位")
    assert any(update.startswith("⏳ 正在排队：你是第 1 位") for update in chats[2].updates)  # moved up
    assert [chat.final for chat in chats] == ["".join(f"word{i} " for i in range(n)) for n in (200, 40, 40)]
    assert server.stats()["peak"] == 1
