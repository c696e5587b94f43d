//! How a stream ends, as a table: for each way a stream's pumping can end
//! ([`End`]), what the client gets, what upstream gets, and which error
//! the metrics count. `Session::finish` carries a row out: the error (or
//! close) to the client if it is between frames, then the close frame to
//! upstream if it is between frames, each at most once.

use super::refusal::Refusal;
use crate::core::devices::Limit;
use crate::core::metrics::Side;
use crate::dataplane::pump::End;

/// What the client gets.
#[derive(Debug)]
pub(super) enum ToClient {
    /// Nothing more (it left, or its close already completed the stream).
    Nothing,
    /// A close frame with this code and no error message.
    Close(u16),
    /// A Soniox-shaped error frame and its close; the stream's error code.
    Error(Refusal),
}

/// One row of the table.
#[derive(Debug)]
pub(super) struct Ending {
    /// What the client gets.
    pub client: ToClient,
    /// The close frame upstream gets: code and reason.
    pub upstream: Option<(u16, &'static str)>,
    /// The error the metrics count, against whom.
    pub counted: Option<(Side, u16)>,
}

impl Ending {
    /// The row for `end`; `client_closed`: the client's close frame went
    /// upstream before the end; `answered`: upstream's last word
    /// (`finished`, or an error) reached the client before it.
    pub(super) fn of(end: End, client_closed: bool, answered: bool) -> Ending {
        let row = |client, upstream, counted| Ending {
            client,
            upstream,
            counted,
        };
        match end {
            // The normal end, and the ends where the caller already did
            // what there was to do (a retry, a client close answered).
            End::UpstreamClosed | End::Retry(..) | End::ClientClosed => {
                row(ToClient::Nothing, None, None)
            }
            // Its close frame already went up: upstream gets no second one.
            End::ClientGone if client_closed => row(ToClient::Nothing, None, None),
            End::ClientGone => row(ToClient::Nothing, Some((1001, "client went away")), None),
            End::ClientProtocol(e) => row(
                ToClient::Error(Refusal::new(
                    400,
                    "bad_request",
                    e.reason(),
                    e.close_code(),
                    Side::Client,
                )),
                Some((1001, "client protocol error")),
                Some((Side::Client, e.close_code())),
            ),
            // The client's close went up, and then it stopped reading: a
            // write to it waited `limits.stall_timeout`. The close it
            // waits for seldom reaches its full socket; the client's
            // failure, as a stall of its own before its close is.
            End::ClientStalled if client_closed => {
                row(ToClient::Close(1000), None, Some((Side::Client, 408)))
            }
            // Upstream's last word was read, and a write to the client
            // (of it, or of the results before it) waited on its full
            // socket: the client stopped reading. Its failure, as any
            // stall of its own; after `finished` it waits for no error
            // frame, only the close.
            End::ClientStalled if answered => row(
                ToClient::Close(1000),
                Some((1001, "client stopped reading")),
                Some((Side::Client, 408)),
            ),
            // The client's close went up: all it waits for is the answer.
            // Whatever ended the wait (upstream hung up, broke the protocol
            // or never answered; the relay's own stop), the relay answers
            // it in upstream's place, with no data frame after the client's
            // close and no second close upstream. Nobody's error.
            End::UpstreamGone
            | End::UpstreamProtocol(_)
            | End::UpstreamStalled
            | End::UpstreamSilent
            | End::Idle
            | End::Stopped(_)
            | End::Drain
            | End::KeyRetired
            | End::Resume(..)
                if client_closed =>
            {
                row(ToClient::Close(1000), None, None)
            }
            // Upstream's last word reached the client, which waits only
            // for the close: upstream failing now (hanging up, falling
            // silent, breaking the protocol) is not the stream's failure,
            // and the relay closes in upstream's place.
            End::UpstreamGone
            | End::UpstreamProtocol(_)
            | End::UpstreamStalled
            | End::UpstreamSilent
            | End::Idle
            | End::Resume(..)
                if answered =>
            {
                row(ToClient::Close(1000), None, None)
            }
            End::UpstreamGone
            | End::UpstreamProtocol(_)
            | End::UpstreamStalled
            | End::UpstreamSilent => {
                let r = Refusal::upstream_lost();
                let counted = Some((Side::Upstream, r.code));
                row(ToClient::Error(r), None, counted)
            }
            End::Idle => client_timeout(
                "No audio or messages in time; the stream was idle.",
                (1000, "idle"),
            ),
            // The client stopped reading while it went on sending, and
            // upstream, its results backed up, stopped reading in turn.
            // The error frame seldom reaches a full socket; the count says
            // whose failure it was.
            End::ClientStalled => client_timeout(
                "The client stopped reading its results.",
                (1001, "client stopped reading"),
            ),
            End::Stopped(limit) => {
                let message = match limit {
                    Limit::Revoked => "This device or session token has been revoked.",
                    Limit::DailyAudio => "Device limit reached: daily audio allowance used up.",
                    _ => "Device limit reached: the longest a stream may last.",
                };
                let r = Refusal::device(limit, message.to_string());
                let counted = Some((Side::Client, r.code));
                row(
                    ToClient::Error(r),
                    Some((1000, "ended by the relay")),
                    counted,
                )
            }
            // After the drain's finalize (if the stream was between frames):
            // reconnect, as Soniox says it (503, close 1012).
            End::Drain => reconnect("The relay is restarting", "relay restarting"),
            // A stream that could not move off its retired key: finalized
            // as in a drain, then told to reconnect (onto a current key).
            End::KeyRetired => reconnect("The stream's account key was retired", "key retired"),
            // An error the stream could not resume from (its resumes used
            // up, or its copy no longer whole).
            End::Resume(..) => row(ToClient::Error(Refusal::upstream_lost()), None, None),
        }
    }
}

/// How an error Soniox sent, passed to the client unchanged, is counted:
/// 401, 402, 429 and 5xx as upstream's (on the stream's account too); any
/// other 4xx (400 a bad config, 408 no audio) as the client's. A code
/// outside 400-599 is no error Soniox documents: counted as upstream's
/// 502, so that upstream cannot make the label take any value it likes.
pub(super) fn soniox_error(code: u16) -> (Side, u16) {
    match code {
        401 | 402 | 429 | 500..=599 => (Side::Upstream, code),
        400..=499 => (Side::Client, code),
        _ => (Side::Upstream, 502),
    }
}

/// The relay's own end of a stream it asks the client to open again:
/// `why`, then "reconnect to continue", as Soniox says it (503, close
/// 1012); upstream gets a close 1001 saying `upstream_reason`.
fn reconnect(why: &str, upstream_reason: &'static str) -> Ending {
    Ending {
        client: ToClient::Error(Refusal::new(
            503,
            "service_unavailable",
            format!("{why}; reconnect to continue."),
            1012,
            Side::Internal,
        )),
        upstream: Some((1001, upstream_reason)),
        counted: None,
    }
}

/// A stream the client let time out: 408 with `message` (close 1000),
/// counted as the client's error; upstream gets the close `upstream`.
fn client_timeout(message: &str, upstream: (u16, &'static str)) -> Ending {
    Ending {
        client: ToClient::Error(Refusal::new(
            408,
            "request_timeout",
            message,
            1000,
            Side::Client,
        )),
        upstream: Some(upstream),
        counted: Some((Side::Client, 408)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clio_frame::frame::FrameError;

    /// Every way a stream ends that tells the client an error also says so
    /// in its error code, and only the relay's own ends (drain, a resume
    /// that could not be made) go uncounted as a client or upstream error.
    #[test]
    fn soniox_errors_are_counted_by_whose_they_are() {
        assert_eq!(soniox_error(503), (Side::Upstream, 503));
        assert_eq!(soniox_error(402), (Side::Upstream, 402));
        assert_eq!(soniox_error(408), (Side::Client, 408));
        assert_eq!(soniox_error(400), (Side::Client, 400));
        assert_eq!(soniox_error(65535), (Side::Upstream, 502));
        assert_eq!(soniox_error(0), (Side::Upstream, 502));
    }

    #[test]
    fn each_end_tells_the_client_and_upstream_what_the_contract_says() {
        let code = |e: &Ending| match &e.client {
            ToClient::Error(r) => Some((r.code, r.close)),
            ToClient::Close(c) => Some((0, *c)),
            ToClient::Nothing => None,
        };
        let idle = Ending::of(End::Idle, false, false);
        assert_eq!(code(&idle), Some((408, 1000)));
        assert_eq!(idle.upstream, Some((1000, "idle")));
        let stalled = Ending::of(End::ClientStalled, false, false);
        assert_eq!(code(&stalled), Some((408, 1000)));
        assert_eq!(stalled.counted, Some((Side::Client, 408)));
        let gone = Ending::of(End::UpstreamGone, false, false);
        assert_eq!(code(&gone), Some((503, 1011)));
        assert_eq!(gone.counted, Some((Side::Upstream, 503)));
        for end in [
            End::UpstreamGone,
            End::UpstreamProtocol(FrameError::BadClose),
            End::UpstreamStalled,
            End::UpstreamSilent,
            End::ClientStalled,
            End::Idle,
            End::Stopped(Limit::Revoked),
            End::Drain,
            End::KeyRetired,
            End::Resume(503, crate::core::keyring::RateScope::Project),
        ] {
            // After the client's close: its answer, nothing else, and
            // nobody's error but the client's own stall.
            let after = Ending::of(end, true, false);
            assert_eq!(code(&after), Some((0, 1000)), "{end:?}");
            let counted = matches!(end, End::ClientStalled).then_some((Side::Client, 408));
            assert_eq!((after.upstream, after.counted), (None, counted), "{end:?}");
            // After upstream's `finished` (or error) reached the client, an
            // upstream failure only costs it the close; a stall of the
            // client's own is still its 408.
            let answered = Ending::of(end, false, true);
            if !matches!(end, End::Stopped(_) | End::Drain | End::KeyRetired) {
                assert_eq!(code(&answered), Some((0, 1000)), "{end:?}");
                assert_eq!(answered.counted, counted, "{end:?}");
            }
        }
        let bad = Ending::of(End::ClientProtocol(FrameError::Masking), false, false);
        assert_eq!(code(&bad), Some((400, 1002)));
        assert_eq!(bad.counted, Some((Side::Client, 1002)));
        let drain = Ending::of(End::Drain, false, false);
        assert_eq!(code(&drain), Some((503, 1012)));
        assert_eq!(drain.counted, None);
        let moved = Ending::of(End::KeyRetired, false, false);
        assert_eq!(code(&moved), Some((503, 1012)));
        assert_eq!(moved.counted, None);
        assert_eq!(moved.upstream, Some((1001, "key retired")));
        let revoked = Ending::of(End::Stopped(Limit::Revoked), false, false);
        assert_eq!(code(&revoked), Some((401, 1008)));
        assert!(Ending::of(End::UpstreamClosed, false, false)
            .upstream
            .is_none());
        assert_eq!(
            Ending::of(End::ClientGone, false, false).upstream,
            Some((1001, "client went away"))
        );
    }
}
