#!/usr/bin/env python3
"""Regenerate tests/hostile/: malformed and hostile inbound messages.

Each file is named `<reason_code>--<what>.json`: the reason code the worker must
park it with (tests/hostile.rs checks every one against the real worker). The
files are committed; run this after changing the cases.
"""
import json, os, shutil

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "hostile")
URL = "http://1253488539.vod2.myqcloud.com/oM86K7X3Ig8b.mp4"

def video(**over):
    v = {"video_play_time": 0, "video_size": 1200, "video_format": "mp4", "video_duration": 3600,
         "video_url": URL, "video_id": "5285890781570653827", "video_type": 0, "user_id": "ios_test1"}
    v.update(over)
    return v

def callback(**over):
    m = {"error_code": 0, "error_msg": "", "expire_time": 1529908745, "timestamp": 1529908745,
         "task_id": "g68cee8e90jcq4ogg8jb", "callback_type": "record_finished",
         "record_user_id": "tic_record_user_1234_01", "start_time": 1529908745, "stop_time": 1529908805,
         "room_id": 1234, "group_id": "1234", "video_info": [video()]}
    m.update(over)
    return m

def result(**over):
    m = {"sdkappid": 1400042982, "room_id": 1234, "group_id": "1234", "record_user_id": "u",
         "start_time": 1558613140, "stop_time": 1558614140, "video_info": [video()]}
    m.update(over)
    return m

def post_class(**over):
    m = {"RoomId": 1234, "GroupId": "1234", "RecordStartTime": 1558613140, "TotalTime": 1440000,
         "VideoInfos": [{"VideoPlayTime": 0, "VideoSize": 13151, "VideoFormat": "mp4", "VideoDuration": 1200000,
                         "VideoUrl": URL, "VideoId": "1", "VideoType": 0, "UserId": "ios_test1"}]}
    m.update(over)
    return m

cases = {}

def add(reason, name, body):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body, ensure_ascii=False)
    if isinstance(body, str):
        body = body.encode("utf-8")
    key = f"{reason}--{name}.json"
    assert key not in cases, key
    cases[key] = body

# --- not JSON at all
for name, body in {
    "empty": b"", "whitespace": b"  \n\t ", "truncated": json.dumps(callback())[:80],
    "missing-commas-doc-4.5.2": open(os.path.join(os.path.dirname(__file__), "..", "examples", "tic", "callback-record-finished.doc.json"), "rb").read(),
    "trailing-comma-doc-4.5.1": open(os.path.join(os.path.dirname(__file__), "..", "examples", "tic", "callback-record-started.doc.json"), "rb").read(),
    "single-quotes": "{'room_id': 1}", "comments": '{"room_id": 1 /* x */}', "nan": '{"room_id": NaN}',
    "infinity": '{"room_id": Infinity}', "hex-number": '{"room_id": 0x10}', "leading-zero": '{"room_id": 01}',
    "unquoted-key": "{room_id: 1}", "binary-garbage": bytes(range(256)), "utf16": '{"room_id":1}'.encode("utf-16"),
    "invalid-utf8": b'{"room_id":1,"group_id":"\xff\xfe"}', "lone-surrogate": '{"group_id":"\\ud800"}'.encode(),
    "two-documents": '{"room_id":1}{"room_id":2}', "deep-nesting-arrays": "[" * 10000 + "]" * 10000,
    "deep-nesting-objects": '{"a":' * 5000 + "1" + "}" * 5000, "huge-exponent": '{"room_id": 1e400}',
    "xml": "<callback><room_id>1</room_id></callback>", "html-error-page": "<html><body>502 Bad Gateway</body></html>",
    "nul-bytes": b"\x00\x00\x00\x00", "bom-then-garbage": b"\xef\xbb\xbf{oops}",
}.items():
    add("invalid_json", name, body)

# --- JSON, but no known format
for name, body in {
    "array": [callback()], "string": "record_finished", "number": 42, "null": None, "true": True,
    "empty-object": {}, "only-unknown-keys": {"hello": "world"}, "wrapped-in-data": {"data": callback()},
    "camel-case": {"roomId": 1, "videoInfo": []}, "nested-array-of-arrays": [[[]]],
}.items():
    add("unknown_format", name, json.dumps(body))

# --- wrong types, with the field path in the error
wrong = {
    "room-id-float": callback(room_id=12.5), "room-id-bool": callback(room_id=True),
    "room-id-array": callback(room_id=[1234]), "room-id-object": callback(room_id={"id": 1}),
    "room-id-words": callback(room_id="one thousand"), "room-id-null": callback(room_id=None),
    "room-id-missing": {k: v for k, v in callback().items() if k != "room_id"},
    "room-id-2pow64": callback(room_id=2**64), "room-id-string-2pow63": callback(room_id=str(2**63)),
    "room-id-negative": callback(room_id=-1), "room-id-plus-sign": callback(room_id="+5"),
    "room-id-padded-string": callback(room_id=" 1234"), "task-id-number": callback(task_id=12345),
    "group-id-array": callback(group_id=["1234"]), "start-time-float": callback(start_time=1.5e9),
    "start-time-missing": {k: v for k, v in callback().items() if k != "start_time"},
    "start-time-negative": callback(start_time=-5), "start-time-far-future": callback(start_time=10**15),
    "video-info-missing": {k: v for k, v in callback().items() if k != "video_info"},
    "video-info-object": callback(video_info={"0": video()}), "video-info-string": callback(video_info="[]"),
    "video-info-nulls": callback(video_info=[None]), "video-info-numbers": callback(video_info=[1, 2]),
    "size-words": callback(video_info=[video(video_size="1.4 MB")]),
    "size-float": callback(video_info=[video(video_size=1200.5)]),
    "size-negative": callback(video_info=[video(video_size=-1)]),
    "duration-null": callback(video_info=[video(video_duration=None)]),
    "duration-negative": callback(video_info=[video(video_duration=-3600)]),
    "offset-negative": callback(video_info=[video(video_play_time=-1)]),
    "offset-huge-negative": callback(video_info=[video(video_play_time=-(2**63))]),
    "video-type-unknown": callback(video_info=[video(video_type=7)]),
    "video-type-string-name": callback(video_info=[video(video_type="camera")]),
    "video-type-negative": callback(video_info=[video(video_type=-1)]),
    "url-missing": callback(video_info=[{k: v for k, v in video().items() if k != "video_url"}]),
    "url-number": callback(video_info=[video(video_url=12345)]),
    "url-not-a-url": callback(video_info=[video(video_url="not a url")]),
    "url-file-scheme": callback(video_info=[video(video_url="file:///etc/passwd")]),
    "url-gopher": callback(video_info=[video(video_url="gopher://1.vod2.myqcloud.com/x")]),
    "url-javascript": callback(video_info=[video(video_url="javascript:alert(1)")]),
    "user-id-number": callback(video_info=[video(user_id=42)]),
    "user-id-nul": callback(video_info=[video(user_id="teacher\u0000")]),
    "user-id-newline-log-injection": callback(video_info=[video(user_id="a\nlevel=error msg=forged")]),
    "user-id-escape-sequence": callback(video_info=[video(user_id="\u001b[31mred")]),
    "video-id-bell": callback(video_info=[video(video_id="\u0007")]),
    "task-id-control": callback(task_id="task\u0085"),
    "record-user-id-delete-char": callback(record_user_id="u\u007f"),
    "format-control": callback(video_info=[video(video_format="mp4\r\n")]),
    "callback-type-unknown": callback(callback_type="record_paused"),
    "callback-type-number": callback(callback_type=1),
    "status-number": {"status": 3, "room_id": 1},
    "post-class-room-id-string-words": post_class(RoomId="abc"),
    "post-class-videoinfos-missing": {k: v for k, v in post_class().items() if k != "VideoInfos"},
    "post-class-total-time-float": post_class(TotalTime=1.5),
    "post-class-video-type-9": post_class(VideoInfos=[dict(post_class()["VideoInfos"][0], VideoType=9)]),
    "post-class-start-missing": {k: v for k, v in post_class().items() if k != "RecordStartTime"},
    "result-sdkappid-float": result(sdkappid=1.5),
    "result-sdkappid-words": result(sdkappid="app"),
    "duplicate-key-last-wins-bad": '{"room_id":1234,"room_id":"x","start_time":1,"video_info":[]}',
}
for name, body in wrong.items():
    add("invalid_field", name, body)

# --- URLs the worker must never fetch or publish (server-side request forgery)
for name, url in {
    "cloud-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "localhost": "http://localhost:15672/api/users", "loopback-ip": "http://127.0.0.1:5672/",
    "private-10": "http://10.0.0.5/a.mp4", "private-192": "http://192.168.1.1/a.mp4",
    "ipv6-loopback": "http://[::1]/a.mp4", "other-domain": "http://evil.example.com/a.mp4",
    "lookalike-suffix": "http://vod2.myqcloud.com.evil.example.com/a.mp4",
    "lookalike-prefix": "http://evilvod2.myqcloud.com/a.mp4", "userinfo-trick": "http://1.vod2.myqcloud.com@evil.example.com/a.mp4",
    "unicode-id-other-host": None,
}.items():
    if url is None:
        add("url_not_allowed", name, callback(video_info=[video(user_id="王老师🎓", video_id="视频-1", video_url="http://evil.example.com/a.mp4")]))
    else:
        add("url_not_allowed", name, callback(video_info=[video(video_url=url)]))

# --- URLs a downstream consumer could read differently from the guard: refused, not repaired
for name, url in {
    "url-crlf-header-injection": URL + "\r\nX-Injected: 1",
    "url-tab-in-host": "http://1253488539.vod2\t.myqcloud.com/a.mp4",
    "url-backslash-userinfo": "http://1.vod2.myqcloud.com\\@127.0.0.1:5672/",
    "url-space": "http://1.vod2.myqcloud.com/a b.mp4",
    "url-line-separator": "http://1.vod2.myqcloud.com/a\u2028.mp4",
}.items():
    add("invalid_field", name, callback(video_info=[video(video_url=url)]))
for name, url in {
    "ipv4-compatible-loopback": "http://[::127.0.0.1]/a.mp4",
    "nat64-metadata": "http://[64:ff9b::a9fe:a9fe]/a.mp4",
    "6to4-loopback": "http://[2002:7f00:1::]/a.mp4",
    "benchmarking-range": "http://198.18.0.1/a.mp4",
    "credentials-on-allowed-host": "http://user:pass@1.vod2.myqcloud.com/a.mp4",
    "punycode-lookalike": "http://1253488539.vod2.myqcl\u043eud.com/a.mp4",
}.items():
    add("url_not_allowed", name, callback(video_info=[video(video_url=url)]))

# --- limits
add("too_many_tracks", "600-tracks", callback(video_info=[video(video_id=str(i)) for i in range(600)]))
add("field_too_long", "user-id-5000-chars", callback(video_info=[video(user_id="x" * 5000)]))
add("field_too_long", "long-key", {("k" * 5000): 1, "room_id": 1})
add("field_too_long", "url-8000-chars", callback(video_info=[video(video_url=URL + "?" + "a" * 8000)]))

# --- the upstream says the recording failed
add("upstream_error", "error-code-20099", callback(error_code=20099, error_msg="internal error"))
add("upstream_error", "error-code-as-string", callback(error_code="20005", error_msg="data read failed"))
add("upstream_error", "query-finished-with-error", {"status": "finished", "error_code": 20005, "room_id": 1})

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
for key, body in sorted(cases.items()):
    with open(os.path.join(OUT, key), "wb") as f:
        f.write(body)
print(f"{len(cases)} messages in {os.path.relpath(OUT)}")
