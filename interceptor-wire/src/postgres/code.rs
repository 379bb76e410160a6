//! Message codes of the PostgreSQL protocol (v3), one enum per direction:
//! the same byte names different messages in each (`E` is Execute from the
//! client and ErrorResponse from the server; likewise `C`, `D` and `S`).

macro_rules! codes {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $b:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vm])* $v = $b,)*
        }

        impl $name {
            /// The message of this direction whose code is `b`, if any.
            pub fn new(b: u8) -> Option<Self> {
                match b {
                    $($b => Some(Self::$v),)*
                    _ => None,
                }
            }

            /// The code on the wire.
            pub fn byte(self) -> u8 {
                self as u8
            }
        }
    };
}

codes!(
    /// What a client sends after its startup packet. Any other code ends
    /// the session, as it does in the server.
    FrontendCode {
        Bind = b'B',
        Close = b'C',
        CopyData = b'd',
        CopyDone = b'c',
        CopyFail = b'f',
        Describe = b'D',
        Execute = b'E',
        Flush = b'H',
        FunctionCall = b'F',
        Parse = b'P',
        /// Password, SASL and GSS responses share it.
        Password = b'p',
        Query = b'Q',
        Sync = b'S',
        Terminate = b'X',
    }
);

codes!(
    /// What a server sends.
    BackendCode {
        Authentication = b'R',
        BackendKeyData = b'K',
        BindComplete = b'2',
        CloseComplete = b'3',
        CommandComplete = b'C',
        CopyData = b'd',
        CopyDone = b'c',
        CopyInResponse = b'G',
        CopyOutResponse = b'H',
        CopyBothResponse = b'W',
        DataRow = b'D',
        EmptyQueryResponse = b'I',
        ErrorResponse = b'E',
        FunctionCallResponse = b'V',
        NegotiateProtocolVersion = b'v',
        NoData = b'n',
        NoticeResponse = b'N',
        NotificationResponse = b'A',
        ParameterDescription = b't',
        ParameterStatus = b'S',
        ParseComplete = b'1',
        PortalSuspended = b's',
        ReadyForQuery = b'Z',
        RowDescription = b'T',
    }
);

impl FrontendCode {
    /// A message of the extended protocol: one a failure makes the server
    /// skip until the next Sync.
    pub fn extended(self) -> bool {
        use FrontendCode::*;
        matches!(self, Parse | Bind | Describe | Execute | Close)
    }
}

impl BackendCode {
    /// Completes the answer to one of the client's messages (an extended
    /// one, until they are all answered: a Describe's RowDescription or
    /// NoData, not its ParameterDescription).
    pub fn completes(self) -> bool {
        use BackendCode::*;
        matches!(
            self,
            ParseComplete
                | BindComplete
                | CloseComplete
                | NoData
                | RowDescription
                | CommandComplete
                | EmptyQueryResponse
                | PortalSuspended
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_and_mean_one_message_per_direction() {
        for b in 0..=u8::MAX {
            if let Some(c) = FrontendCode::new(b) {
                assert_eq!(c.byte(), b);
            }
            if let Some(c) = BackendCode::new(b) {
                assert_eq!(c.byte(), b);
            }
        }
        assert_eq!(FrontendCode::new(b'E'), Some(FrontendCode::Execute));
        assert_eq!(BackendCode::new(b'E'), Some(BackendCode::ErrorResponse));
        assert_eq!(FrontendCode::new(b'Z'), None);
        let client: usize = (0..=u8::MAX).filter_map(FrontendCode::new).count();
        assert_eq!(client, 14);
    }
}
