"""The OpenAI-compatible API (issue 13), driven by the official `openai` SDK against a live server of every family
(tiny checkpoints, real Redis, API_KEY set): the same captions as /caption-images, streaming, OpenAI errors."""
from __future__ import annotations

import base64
import io

import pytest
import requests

from support.families import FAMILIES, PROMPTS
from support.live import LiveServerTestCase
from support.tiny_models import image_bytes, reference_captions, reference_generation, sample_images, tiny_checkpoint

API_KEY = "sk-test-" + "k" * 24
MAX_NEW_TOKENS = 10


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user_turn(data: bytes, text: str | None = None) -> list[dict]:
    content = ([{"type": "text", "text": text}] if text else []) + [
        {"type": "image_url", "image_url": {"url": data_uri(data)}}]
    return [{"role": "user", "content": content}]


class OpenAIChecks:
    """The checks, against one family's server (the classes below choose the family)."""

    pytestmark = pytest.mark.live
    server_env = {"API_KEY": API_KEY, "MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)}
    takes_system: bool

    @classmethod
    def setUpClass(cls) -> None:
        import openai

        super().setUpClass()
        cls.openai = openai
        cls.client = openai.OpenAI(base_url=cls.server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        cls.image = image_bytes(sample_images()[1])
        cls.prompt = PROMPTS[cls.family]
        cls.model_id = str(tiny_checkpoint(cls.family))

    def caption_images(self, data: bytes, prompt: str | None = None) -> dict:
        response = requests.post(self.server.url + "/caption-images", files=[("images", ("x.png", data))],
                                 data={"prompt": prompt} if prompt else None, timeout=120,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
        self.assertEqual(response.status_code, 200, response.text)
        return response.json()["results"][0]

    def test_same_caption_as_caption_images(self) -> None:
        expected = self.caption_images(self.image, self.prompt)
        completion = self.client.chat.completions.create(model=self.model_id,
                                                         messages=user_turn(self.image, self.prompt))
        choice = completion.choices[0]
        self.assertEqual(choice.message.content, expected["caption"])
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertEqual(completion.object, "chat.completion")
        self.assertEqual(completion.model, self.model_id)
        self.assertEqual(completion.model_extra["tags"], expected["tags"])
        self.assertIs(completion.model_extra["cached"], True)
        self.assertGreater(completion.usage.prompt_tokens, 0)
        self.assertGreater(completion.usage.completion_tokens, 0)
        self.assertLessEqual(completion.usage.completion_tokens, MAX_NEW_TOKENS)
        self.assertEqual(completion.usage.total_tokens,
                         completion.usage.prompt_tokens + completion.usage.completion_tokens)

    def test_stream_yields_the_same_text(self) -> None:
        expected = self.caption_images(self.image, self.prompt)["caption"]
        stream = self.client.chat.completions.create(model=self.model_id, messages=user_turn(self.image, self.prompt),
                                                     stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, expected)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length"), True)
        self.assertIsNotNone(chunks[-1].usage, "include_usage: the last chunk carries the usage")
        raw = requests.post(self.server.url + "/v1/chat/completions", timeout=120, stream=True,
                            headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"model": "any", "messages": user_turn(self.image, self.prompt), "stream": True})
        self.assertEqual(raw.headers["Content-Type"].split(";")[0], "text/event-stream")
        self.assertEqual(raw.text.rstrip("\n").rsplit("\n", 1)[-1], "data: [DONE]")

    def test_max_tokens_equals_a_direct_generate(self) -> None:
        from PIL import Image

        # Two images: the tiny Gemma 3 ends its caption of the third sample image itself (at exactly 10 tokens
        # with the prompt), the others run into the limit
        for data in (self.image, image_bytes(sample_images()[2])):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for limit in (3, MAX_NEW_TOKENS):  # the server's own limit: what a request without max_tokens gets
                with self.subTest(max_tokens=limit, image=data is self.image):
                    options = {"max_tokens": limit} if limit != MAX_NEW_TOKENS else {}
                    completion = self.client.chat.completions.create(
                        model=self.model_id, messages=user_turn(data, self.prompt), **options)
                    text, new_tokens, stopped = reference_generation(tiny_checkpoint(self.family), self.family,
                                                                     image, prompt=self.prompt, max_new_tokens=limit)
                    self.assertEqual(completion.choices[0].message.content, text)
                    # The tokens the model generated, counted in generate's output: not the caption tokenized again
                    self.assertEqual(completion.usage.completion_tokens, new_tokens)
                    self.assertEqual(completion.choices[0].finish_reason, "stop" if stopped else "length")
                    again = self.client.chat.completions.create(  # the same from the cache
                        model=self.model_id, messages=user_turn(data, self.prompt), **options)
                    self.assertIs(again.model_extra["cached"], True)
                    self.assertEqual((again.usage.completion_tokens, again.choices[0].finish_reason),
                                     (new_tokens, completion.choices[0].finish_reason))

    def test_bad_requests_raise_bad_request_error(self) -> None:
        cases = {
            "temperature": dict(messages=user_turn(self.image), temperature=0.7),
            "temperature as a string": dict(messages=user_turn(self.image), temperature="0"),
            "temperature as a boolean": dict(messages=user_turn(self.image), temperature=False),
            "n": dict(messages=user_turn(self.image), n=2),
            "max_tokens": dict(messages=user_turn(self.image), max_tokens=MAX_NEW_TOKENS + 1),
            "no image": dict(messages=[{"role": "user", "content": "describe it"}]),
            "two images": dict(messages=[{"role": "user", "content": user_turn(self.image)[0]["content"] * 2}]),
            "not an image": dict(messages=user_turn(b"plain text, not an image")),
            "bad base64": dict(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]),
            "assistant turn": dict(messages=user_turn(self.image) + [{"role": "assistant", "content": "hi"}]),
        }
        for name, kwargs in cases.items():
            with self.subTest(case=name):
                with self.assertRaises(self.openai.BadRequestError) as raised:
                    self.client.chat.completions.create(model=self.model_id, **kwargs)
                body = raised.exception.body
                self.assertTrue(body["message"], body)
                self.assertIn(body["type"], ("invalid_request_error",))
                self.assertTrue(body["code"], body)
        greedy = self.client.chat.completions.create(model=self.model_id, messages=user_turn(self.image))
        for temperature in (0, 0.0):  # a JSON number 0, either way, is greedy decoding: the same caption
            completion = self.client.chat.completions.create(model=self.model_id, messages=user_turn(self.image),
                                                             temperature=temperature)
            self.assertEqual(completion.choices[0].message.content, greedy.choices[0].message.content)

    def test_system_message(self) -> None:
        messages = [{"role": "system", "content": "Answer in five words."}, *user_turn(self.image, self.prompt)]
        if not self.takes_system:
            with self.assertRaises(self.openai.BadRequestError) as raised:
                self.client.chat.completions.create(model=self.model_id, messages=messages)
            self.assertEqual(raised.exception.body["code"], "invalid_prompt")
            return
        from PIL import Image

        completion = self.client.chat.completions.create(model=self.model_id, messages=messages)
        direct = reference_captions(tiny_checkpoint(self.family), self.family,
                                    [Image.open(io.BytesIO(self.image)).convert("RGB")], prompt=self.prompt,
                                    max_new_tokens=MAX_NEW_TOKENS, system_prompt="Answer in five words.")
        self.assertEqual(completion.choices[0].message.content, direct[0])
        self.assertIs(completion.model_extra["cached"], False, "the system turn is part of the cache key")

    def test_api_key_and_models(self) -> None:
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], [self.model_id])
        self.assertEqual(self.client.models.retrieve(self.model_id).id, self.model_id)
        with self.assertRaises(self.openai.NotFoundError):
            self.client.models.retrieve("gpt-4o")
        wrong = self.openai.OpenAI(base_url=self.server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with self.assertRaises(self.openai.AuthenticationError):
            wrong.models.list()
        with self.assertRaises(self.openai.AuthenticationError):
            wrong.chat.completions.create(model=self.model_id, messages=user_turn(self.image))
        denied = requests.post(self.server.url + "/caption-images", files=[("images", ("x.png", self.image))],
                               timeout=60)
        self.assertEqual((denied.status_code, denied.json()["error"]["code"]), (401, "invalid_api_key"))


class TestBlip(OpenAIChecks, LiveServerTestCase):
    family = "blip"
    takes_system = False


class TestBlip2(OpenAIChecks, LiveServerTestCase):
    family = "blip2"
    takes_system = False


class TestGemma(OpenAIChecks, LiveServerTestCase):
    family = "gemma"
    takes_system = True


class TestInternVL(OpenAIChecks, LiveServerTestCase):
    family = "intern_vlm"
    takes_system = True


assert {c.family for c in (TestBlip, TestBlip2, TestGemma, TestInternVL)} == set(FAMILIES), "a family is untested"
