"""Streams audio through the relay with the official Soniox Python SDK.

Usage: soniox_python_stream.py WS_URL TOKEN AUDIO_FILE

Opens a real-time session the way the SDK's own examples do (config on
connect, then all the audio, then the end of audio), reads every event
until the stream ends, and prints one JSON line: the final text, the error
(if any) and whether `finished` arrived. Exits 0 unless the SDK raised.
AUDIO_FILE `-` sends no audio: the session reads its events right after
the config, as an app whose audio comes from another thread does.
"""

import json
import sys

from soniox import SonioxClient
from soniox.types import RealtimeSTTConfig


def main() -> int:
    url, token, audio_path = sys.argv[1:4]
    audio = b""
    if audio_path != "-":
        with open(audio_path, "rb") as f:
            audio = f.read()
    client = SonioxClient(api_key=token, websocket_base_url=url)
    config = RealtimeSTTConfig(
        model="stt-rt-v4",
        audio_format="pcm_s16le",
        sample_rate=16000,
        num_channels=1,
    )
    chunks = [audio[i : i + 3200] for i in range(0, len(audio), 3200)]
    text, error, finished = [], None, False
    try:
        with client.realtime.stt.connect(config=config) as session:
            # All audio at once, right after the config: what a client with
            # buffered audio does, and what no open-time failover can wait out.
            if audio_path != "-":
                session.send_bytes(iter(chunks), finish=True)
            for event in session.receive_events():
                if event.error_code is not None:
                    error = event.error_code
                for token_ in event.tokens:
                    if token_.is_final:
                        text.append(token_.text)
                if event.finished:
                    finished = True
    except Exception as e:  # noqa: BLE001 - report whatever the SDK raised
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"text": "".join(text), "error": error, "finished": finished}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
