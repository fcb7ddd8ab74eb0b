"""The chat page in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
a message sent from the page streams its answer into the page, and the next turn carries the history.
The expected answers are generate.py's greedy continuations of the same conversations."""

from __future__ import annotations

import shutil

import pytest
import torch

from checkpoint import load_model
from generate import pick_dtype, stream_ids
from serve_helpers import Server, tiny_checkpoint
from tokenizer import Tokenizer

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("browser") / "tiny.pt")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path too, Selenium Manager has nothing to download
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def greedy(checkpoint, messages: list[dict]) -> str:
    model = load_model(checkpoint, dtype=pick_dtype("auto", torch.device("cpu")))
    tok = Tokenizer()
    return "".join(stream_ids(model, tok, tok.encode_chat(messages), MAX_TOKENS, temperature=0.0))


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def answer_of_turn(driver, turn: int):
    """The turn-th assistant bubble once its stream has finished."""
    def finished(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        done = len(bubbles) > turn and "streaming" not in bubbles[turn].get_attribute("class")
        return bubbles[turn] if done else False
    return WebDriverWait(driver, 60).until(finished)


def test_a_message_sent_from_the_page_streams_its_answer_and_the_next_turn_keeps_the_history(server, browser,
                                                                                              checkpoint, tmp_path):
    browser.get(f"{server.url}/")
    WebDriverWait(browser, 30).until(lambda d: "context" in d.find_element(By.ID, "model").text)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    set_field(browser, "system", "Be brief.")
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?", Keys.ENTER)
    first = answer_of_turn(browser, 0)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    expected = greedy(checkpoint, history)
    assert first.get_attribute("textContent") == expected and first.is_displayed()
    assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces, each shown as it came
    assert first.get_attribute("data-finish") == "length" and "tokens/s" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "prompt").send_keys("And of Italy?", Keys.ENTER)
    second = answer_of_turn(browser, 1)
    history += [{"role": "assistant", "content": expected}, {"role": "user", "content": "And of Italy?"}]
    assert second.get_attribute("textContent") == greedy(checkpoint, history)
    browser.save_screenshot(str(tmp_path / "chat.png"))

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
