//! A sleep that ends when it is due, for the source's gather.
//!
//! tokio's timer counts whole milliseconds: a deadline is rounded up to the next tick of
//! its wheel, and the runtime's wait on its sockets (`epoll_wait`) takes its timeout in
//! milliseconds, rounded up again. The gather's 2 ms therefore lasted 3.0 ms at the median
//! and 4.5 ms at the 99th percentile at 5,000 one-row transactions a second
//! (docs/benchmarks.md, "A gather that ends on time"). On Linux this sleep is a `timerfd`
//! registered with tokio's reactor: the wait on the sockets returns when the timer fires,
//! within the kernel's timer slack (50 µs). Elsewhere, or if the kernel refuses a timerfd,
//! it is tokio's sleep.

use std::time::Instant;

/// One timer, armed by each [`Timer::sleep_until`].
pub struct Timer {
    #[cfg(target_os = "linux")]
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
}

impl Timer {
    /// A timer on this runtime's reactor (tokio's timer when that cannot be had).
    pub fn new() -> Timer {
        #[cfg(target_os = "linux")]
        {
            Timer { fd: timerfd() }
        }
        #[cfg(not(target_os = "linux"))]
        {
            Timer {}
        }
    }

    /// Sleep until `until` (at once when it has passed).
    pub async fn sleep_until(&mut self, until: Instant) {
        #[cfg(target_os = "linux")]
        if let Some(fd) = &self.fd {
            match sleep_on(fd, until).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!("the gather's timerfd failed ({e}); using tokio's timer");
                    self.fd = None;
                }
            }
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    }
}

impl Default for Timer {
    fn default() -> Timer {
        Timer::new()
    }
}

#[cfg(target_os = "linux")]
fn timerfd() -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: timerfd_create takes no pointers; a non-negative result is a new descriptor
    // that nothing else owns.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: see above.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: the descriptor is owned by what is registered, so it stays open as long as
    // the registration.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}

/// Arm `fd` to fire once at `until` (std's `Instant` is CLOCK_MONOTONIC on Linux, but
/// holds no public time: the time left is armed, relative) and wait until it fired.
#[cfg(target_os = "linux")]
async fn sleep_on(
    fd: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    until: Instant,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(());
    }
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
    // Arming resets the count of expirations not yet read.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    loop {
        let mut ready = fd.readable().await?;
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `count`.
        let read = ready.try_io(|fd| {
            match unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) } {
                n if n < 0 => Err(std::io::Error::last_os_error()),
                n => Ok(n),
            }
        });
        match read {
            // Fired (a readiness left from an earlier sleep reads nothing: WouldBlock).
            Ok(Ok(_)) if Instant::now() >= until => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn a_sleep_ends_on_time_not_on_the_next_millisecond() {
        let mut timer = Timer::new();
        #[cfg(target_os = "linux")]
        assert!(timer.fd.is_some(), "no timerfd");
        // tokio's timer ended these 700 µs sleeps 1.4 ms late at the median; this one ends
        // within the kernel's slack and the time to be scheduled.
        let mut late = Vec::new();
        for _ in 0..50 {
            let until = Instant::now() + Duration::from_micros(700);
            timer.sleep_until(until).await;
            let now = Instant::now();
            assert!(now >= until, "woke {:?} early", until - now);
            late.push(now - until);
        }
        late.sort();
        let median = late[late.len() / 2];
        assert!(
            median < Duration::from_micros(600),
            "median lateness {median:?}"
        );
        // A deadline that has passed returns at once.
        timer.sleep_until(Instant::now()).await;
        // A sleep given up while armed fires meanwhile; the next one still waits its time.
        use futures_util::FutureExt;
        let first = Instant::now() + Duration::from_micros(500);
        assert!(timer.sleep_until(first).now_or_never().is_none());
        std::thread::sleep(Duration::from_millis(2));
        let until = Instant::now() + Duration::from_millis(3);
        timer.sleep_until(until).await;
        assert!(Instant::now() >= until, "woke early");
    }
}
